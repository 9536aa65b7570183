#include "cluster/etcd.h"

#include <httplib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>

namespace larder::cluster {

using nlohmann::json;

bool split_host_port(const std::string& s, std::string& host, int& port) {
  size_t colon;
  if (!s.empty() && s[0] == '[') {
    size_t close = s.find(']');
    if (close == std::string::npos || close + 1 >= s.size() || s[close + 1] != ':') return false;
    host = s.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = s.rfind(':');
    if (colon == std::string::npos) return false;
    host = s.substr(0, colon);
    if (host.find(':') != std::string::npos) return false;  // an IPv6 literal needs brackets
  }
  std::string p = s.substr(colon + 1);
  if (host.empty() || p.empty() || p.size() > 5) return false;
  for (char c : p)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  port = std::atoi(p.c_str());
  return port >= 1 && port <= 65535;
}

namespace {

// etcd's gateway writes int64 fields as strings ("TTL":"10"); accept numbers too.
int64_t json_i64(const json& j, const char* key, int64_t def = 0) {
  auto it = j.find(key);
  if (it == j.end()) return def;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_string()) {
    const std::string& s = it->get_ref<const std::string&>();
    char* end = nullptr;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (end && *end == '\0' && !s.empty()) return v;
  }
  return def;
}

std::string describe(httplib::Error e) {
  switch (e) {
    case httplib::Error::Connection: return "cannot connect";
    case httplib::Error::Read: return "no answer (read failed or timed out)";
    case httplib::Error::Write: return "write failed";
    default: return httplib::to_string(e);
  }
}

std::string json_str(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

// The first key after every key that starts with prefix (etcd's range_end for a prefix scan).
std::string prefix_end(const std::string& prefix) {
  std::string end = prefix;
  while (!end.empty()) {
    unsigned char c = static_cast<unsigned char>(end.back());
    if (c < 0xff) {
      end.back() = static_cast<char>(c + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // empty prefix: every key
}

const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

// Runs in httplib while it holds its socket lock, before connect: a cancel() that came before
// the socket existed (so Client::stop() had nothing to shut) still ends the call.
httplib::SocketOptions cancel_aware_socket_options(EtcdCancel* cancel, bool keepalive) {
  return [cancel, keepalive](socket_t fd) {
    if (keepalive) {
      // A watch idles for minutes: let the kernel notice a peer that vanished without a FIN
      // (host down, partition) in about 10 + 5 * 3 s instead of hours.
      int on = 1, idle = 10, intvl = 5, cnt = 3;
      ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
      ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
    }
    if (cancel && cancel->cancelled()) ::shutdown(fd, SHUT_RDWR);
  };
}

Result<KeyValue> parse_kv(const json& kv, const char* what) {
  if (!kv.is_object()) return make_error("etcd %s: a key-value is not an object", what);
  KeyValue out;
  auto k = base64_decode(json_str(kv, "key"));
  if (!k.ok()) return make_error("etcd %s: key: %s", what, k.error().c_str());
  out.key = std::move(k.value());
  auto v = base64_decode(json_str(kv, "value"));
  if (!v.ok()) return make_error("etcd %s: value of '%s': %s", what, out.key.c_str(), v.error().c_str());
  out.value = std::move(v.value());
  out.create_revision = json_i64(kv, "create_revision");
  out.mod_revision = json_i64(kv, "mod_revision");
  out.version = json_i64(kv, "version");
  out.lease = json_i64(kv, "lease");
  return out;
}

int64_t header_revision(const json& j) {
  auto h = j.find("header");
  return h != j.end() && h->is_object() ? json_i64(*h, "revision") : 0;
}

}  // namespace

void EtcdCancel::cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  cancelled_.store(true);
  if (active_) active_->stop();  // shuts the socket down: a blocked connect/read returns at once
}

void EtcdCancel::reset() {
  std::lock_guard<std::mutex> lk(mu_);
  cancelled_.store(false);
}

// While alive, `cli` is the connection cancel->cancel() stops. Declared after the client so that
// it lets go before the client is destroyed.
struct EtcdClient::Attached {
  EtcdCancel* c;
  Attached(EtcdCancel* cancel, httplib::Client* cli) : c(cancel) {
    if (!c) return;
    std::lock_guard<std::mutex> lk(c->mu_);
    c->active_ = cli;
  }
  ~Attached() {
    if (!c) return;
    std::lock_guard<std::mutex> lk(c->mu_);
    c->active_ = nullptr;
  }
  Attached(const Attached&) = delete;
  Attached& operator=(const Attached&) = delete;
};

Result<std::vector<std::string>> parse_etcd_url(const std::string& url) {
  const char* usage = "use etcd://HOST:PORT[,HOST:PORT]";
  std::string rest = url;
  size_t scheme = rest.find("://");
  if (scheme != std::string::npos) {
    std::string s = rest.substr(0, scheme);
    if (s != "etcd")
      return make_error("etcd address '%s': unsupported scheme '%s' (%s)", url.c_str(), s.c_str(), usage);
    rest = rest.substr(scheme + 3);
  }
  if (rest.empty()) return make_error("etcd address '%s' names no endpoint (%s)", url.c_str(), usage);
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    size_t comma = rest.find(',', pos);
    std::string item = rest.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.empty()) return make_error("etcd address '%s' has an empty endpoint (%s)", url.c_str(), usage);
    std::string host;
    int port = 0;
    if (item.find('/') != std::string::npos || !split_host_port(item, host, port))
      return make_error("etcd address '%s': '%s' is not HOST:PORT with a port 1..65535 (%s)", url.c_str(),
                        item.c_str(), usage);
    out.push_back(item);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

std::string base64_encode(const std::string& in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v =
        static_cast<uint8_t>(in[i]) << 16 | static_cast<uint8_t>(in[i + 1]) << 8 | static_cast<uint8_t>(in[i + 2]);
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += kB64[v & 63];
  }
  if (i + 1 == in.size()) {
    uint32_t v = static_cast<uint8_t>(in[i]) << 16;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    uint32_t v = static_cast<uint8_t>(in[i]) << 16 | static_cast<uint8_t>(in[i + 1]) << 8;
    out += kB64[v >> 18];
    out += kB64[(v >> 12) & 63];
    out += kB64[(v >> 6) & 63];
    out += '=';
  }
  return out;
}

Result<std::string> base64_decode(const std::string& in) {
  std::string s = in;
  while (!s.empty() && s.back() == '=') s.pop_back();
  if (in.size() - s.size() > 2 || s.size() % 4 == 1) return make_error("invalid base64 (length %zu)", in.size());
  std::string out;
  out.reserve(s.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : s) {
    int v;
    if (c >= 'A' && c <= 'Z') v = c - 'A';
    else if (c >= 'a' && c <= 'z') v = c - 'a' + 26;
    else if (c >= '0' && c <= '9') v = c - '0' + 52;
    else if (c == '+' || c == '-') v = 62;
    else if (c == '/' || c == '_') v = 63;
    else return make_error("invalid base64 character 0x%02x", static_cast<unsigned char>(c));
    acc = acc << 6 | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

EtcdClient::EtcdClient(std::vector<std::string> endpoints, int timeout_ms)
    : endpoints_(std::move(endpoints)), timeout_ms_(timeout_ms > 0 ? timeout_ms : 1000) {}

Result<json> EtcdClient::call(const char* path, const json& body, EtcdCancel* cancel) {
  if (endpoints_.empty()) return make_error("etcd: no endpoint configured");
  const std::string payload = body.dump();
  const time_t sec = timeout_ms_ / 1000;
  const time_t usec = static_cast<time_t>(timeout_ms_ % 1000) * 1000;
  std::string errors;
  const size_t n = endpoints_.size();
  const size_t first = preferred_.load() % n;
  for (size_t k = 0; k < n; ++k) {
    if (cancel && cancel->cancelled()) return make_error("etcd: cancelled");
    const size_t idx = (first + k) % n;
    const std::string& ep = endpoints_[idx];
    std::string host;
    int port = 0;
    if (!split_host_port(ep, host, port)) {
      errors += (errors.empty() ? "" : "; ") + ep + ": not HOST:PORT";
      continue;
    }
    httplib::Client cli(host, port);
    cli.set_connection_timeout(sec, usec);
    cli.set_read_timeout(sec, usec);
    cli.set_write_timeout(sec, usec);
    cli.set_keep_alive(false);
    if (cancel) cli.set_socket_options(cancel_aware_socket_options(cancel, false));
    Attached attached(cancel, &cli);
    // etcd 3.4's gateway ends every error answer with an HTTP trailer, which cpp-httplib 0.11
    // cannot parse (a Read error after the whole body): collect the body and status ourselves
    // and accept a Read error once a complete JSON object has arrived.
    httplib::Request req;
    req.method = "POST";
    req.path = path;
    req.body = payload;
    req.set_header("Content-Type", "application/json");
    int status = 0;
    std::string text;
    req.response_handler = [&status](const httplib::Response& r) {
      status = r.status;
      return true;
    };
    req.content_receiver = [&text](const char* d, size_t n, uint64_t, uint64_t) {
      text.append(d, n);
      return true;
    };
    auto res = cli.send(req);
    // Streaming RPCs (lease keepalive) answer newline-separated objects: the first is ours.
    json j = json::parse(text.substr(0, text.find('\n')), nullptr, /*allow_exceptions=*/false);
    const bool answered = res || (res.error() == httplib::Error::Read && status != 0 && j.is_object());
    if (!answered) {
      errors += (errors.empty() ? "" : "; ") + ep + ": " + describe(res.error());
      continue;
    }
    if (status == 200 && j.is_object()) {
      preferred_.store(idx);
      if (auto it = j.find("result"); it != j.end() && it->is_object()) return json(*it);
      return j;
    }
    std::string msg;
    if (j.is_object()) msg = json_str(j, "message").empty() ? json_str(j, "error") : json_str(j, "message");
    if (msg.empty()) msg = "HTTP " + std::to_string(status);
    // gRPC code 14 (unavailable: no leader, shutting down) or a 5xx: another member may answer.
    if (json_i64(j.is_object() ? j : json::object(), "code") == 14 || status >= 500) {
      errors += (errors.empty() ? "" : "; ") + ep + ": " + msg;
      continue;
    }
    return make_error("etcd %s: %s", ep.c_str(), msg.c_str());
  }
  return make_error("etcd unreachable (%s)", errors.c_str());
}

Result<int64_t> EtcdClient::lease_grant(int ttl_s) {
  LARDER_TRY(j, call("/v3/lease/grant", json{{"TTL", ttl_s}}));
  const int64_t id = json_i64(j, "ID");
  if (id == 0) {
    std::string err = json_str(j, "error");
    return make_error("etcd lease grant failed%s%s", err.empty() ? "" : ": ", err.c_str());
  }
  return id;
}

Result<int64_t> EtcdClient::lease_keepalive(int64_t id) {
  LARDER_TRY(j, call("/v3/lease/keepalive", json{{"ID", std::to_string(id)}}));
  // An expired or unknown lease comes back without a TTL.
  return json_i64(j, "TTL", 0);
}

Status EtcdClient::lease_revoke(int64_t id) {
  LARDER_TRY(j, call("/v3/lease/revoke", json{{"ID", std::to_string(id)}}));
  (void)j;
  return Status::Ok();
}

Status EtcdClient::put(const std::string& key, const std::string& value, int64_t lease) {
  json body{{"key", base64_encode(key)}, {"value", base64_encode(value)}};
  if (lease != 0) body["lease"] = std::to_string(lease);
  LARDER_TRY(j, call("/v3/kv/put", body));
  (void)j;
  return Status::Ok();
}

Result<RangeResult> EtcdClient::range_prefix(const std::string& prefix, EtcdCancel* cancel) {
  json body{{"key", base64_encode(prefix)}, {"range_end", base64_encode(prefix_end(prefix))}};
  LARDER_TRY(j, call("/v3/kv/range", body, cancel));
  RangeResult out;
  out.revision = header_revision(j);
  auto it = j.find("kvs");
  if (it == j.end()) return out;  // no key: the gateway leaves "kvs" out
  if (!it->is_array()) return make_error("etcd range: 'kvs' is not an array");
  out.kvs.reserve(it->size());
  for (const json& kv : *it) {
    LARDER_TRY(one, parse_kv(kv, "range"));
    out.kvs.push_back(std::move(one));
  }
  return out;
}

Result<std::vector<std::pair<std::string, std::string>>> EtcdClient::get_prefix(const std::string& prefix) {
  LARDER_TRY(r, range_prefix(prefix));
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(r.kvs.size());
  for (KeyValue& kv : r.kvs) out.emplace_back(std::move(kv.key), std::move(kv.value));
  return out;
}

Status EtcdClient::del(const std::string& key) {
  LARDER_TRY(j, call("/v3/kv/deleterange", json{{"key", base64_encode(key)}}));
  (void)j;
  return Status::Ok();
}

namespace {

// What one message of a watch stream says.
struct WatchStep {
  enum Kind { Continue, Stop, Compacted, Failed } kind = Continue;
  int64_t compact_revision = 0;
  std::string error;
};

// Gateway stream format (etcd 3.4): one JSON object per line, {"result": WatchResponse} or,
// when the RPC fails mid-stream, {"error": {"grpc_code", "http_code", "message", ...}} (that
// last one without a newline). Zero values are left out: a PUT event has no "type".
WatchStep parse_watch_message(const std::string& line, WatchResponse& wr) {
  WatchStep step;
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    step.kind = WatchStep::Failed;
    step.error = "watch: a message is not a JSON object";
    return step;
  }
  if (auto e = j.find("error"); e != j.end()) {
    step.kind = WatchStep::Failed;
    std::string msg = e->is_object() ? json_str(*e, "message") : e->is_string() ? e->get<std::string>() : "";
    step.error = "watch: " + (msg.empty() ? e->dump() : msg);
    return step;
  }
  auto r = j.find("result");
  if (r == j.end() || !r->is_object()) {
    step.kind = WatchStep::Failed;
    step.error = "watch: a message has no 'result'";
    return step;
  }
  const json& res = *r;
  if (res.value("canceled", false)) {
    const int64_t compact = json_i64(res, "compact_revision");
    if (compact > 0) {
      step.kind = WatchStep::Compacted;
      step.compact_revision = compact;
    } else {
      step.kind = WatchStep::Failed;
      std::string why = json_str(res, "cancel_reason");
      step.error = "watch: cancelled by etcd" + (why.empty() ? std::string() : ": " + why);
    }
    return step;
  }
  wr.revision = header_revision(res);
  wr.created = res.value("created", false);
  wr.events.clear();
  if (auto evs = res.find("events"); evs != res.end() && evs->is_array()) {
    wr.events.reserve(evs->size());
    for (const json& ev : *evs) {
      if (!ev.is_object()) continue;
      WatchEvent out;
      out.type = json_str(ev, "type") == "DELETE" ? WatchEvent::Type::Delete : WatchEvent::Type::Put;
      auto kv = parse_kv(ev.value("kv", json::object()), "watch");
      if (!kv.ok()) {
        step.kind = WatchStep::Failed;
        step.error = kv.error();
        return step;
      }
      out.kv = std::move(kv.value());
      if (auto p = ev.find("prev_kv"); p != ev.end() && p->is_object()) {
        auto prev = parse_kv(*p, "watch");
        if (prev.ok()) {
          out.has_prev = true;
          out.prev_kv = std::move(prev.value());
        }
      }
      wr.events.push_back(std::move(out));
    }
  }
  return step;
}

}  // namespace

Result<WatchEnd> EtcdClient::watch_prefix(const std::string& prefix, int64_t start_revision,
                                          const std::function<bool(const WatchResponse&)>& on_response,
                                          EtcdCancel* cancel) {
  if (endpoints_.empty()) return make_error("etcd: no endpoint configured");
  json create{{"key", base64_encode(prefix)},
              {"range_end", base64_encode(prefix_end(prefix))},
              {"prev_kv", true},
              // Without these a connected but idle stream sends nothing for ever; etcd sends
              // them to idle watchers only (every 10 min by default).
              {"progress_notify", true}};
  if (start_revision > 0) create["start_revision"] = std::to_string(start_revision);
  const std::string payload = json{{"create_request", create}}.dump();
  const time_t sec = timeout_ms_ / 1000;
  const time_t usec = static_cast<time_t>(timeout_ms_ % 1000) * 1000;
  // Longer than etcd's default progress-notification interval: a silent stream is a dead one.
  const time_t idle_s = 15 * 60;
  std::string errors;
  const size_t n = endpoints_.size();
  const size_t first = preferred_.load() % n;
  for (size_t k = 0; k < n; ++k) {
    if (cancel && cancel->cancelled()) return WatchEnd{};
    const size_t idx = (first + k) % n;
    const std::string& ep = endpoints_[idx];
    std::string host;
    int port = 0;
    if (!split_host_port(ep, host, port)) {
      errors += (errors.empty() ? "" : "; ") + ep + ": not HOST:PORT";
      continue;
    }
    httplib::Client cli(host, port);
    cli.set_connection_timeout(sec, usec);
    cli.set_write_timeout(sec, usec);
    cli.set_read_timeout(idle_s, 0);
    cli.set_keep_alive(false);
    cli.set_socket_options(cancel_aware_socket_options(cancel, true));
    Attached attached(cancel, &cli);

    httplib::Request req;
    req.method = "POST";
    req.path = "/v3/watch";
    req.body = payload;
    req.set_header("Content-Type", "application/json");
    // Passed on as gRPC metadata: etcd then ends the watch ("no leader") when this member loses
    // its leader. Without it a watch on a member cut off from the quorum stays open and silent.
    req.set_header("Grpc-Metadata-hasleader", "true");
    int status = 0;
    std::string buf;  // an incomplete line of the stream, or an error answer's body
    WatchEnd end;
    WatchStep last;
    bool created = false;
    WatchResponse wr;
    auto handle = [&](const std::string& line) {
      last = parse_watch_message(line, wr);
      if (last.kind != WatchStep::Continue) return false;
      end.revision = std::max(end.revision, wr.revision);
      if (wr.created && !created) {
        created = true;
        preferred_.store(idx);
      }
      if (!on_response(wr)) {
        last.kind = WatchStep::Stop;
        return false;
      }
      return true;
    };
    req.response_handler = [&status](const httplib::Response& r) {
      status = r.status;
      return true;
    };
    req.content_receiver = [&](const char* d, size_t len, uint64_t, uint64_t) {
      if (cancel && cancel->cancelled()) return false;
      buf.append(d, len);
      if (status != 200) return buf.size() < (1u << 20);  // an error answer: kept whole below
      size_t start = 0;
      for (size_t nl; (nl = buf.find('\n', start)) != std::string::npos; start = nl + 1) {
        if (nl == start) continue;
        if (!handle(buf.substr(start, nl - start))) return false;
      }
      buf.erase(0, start);
      return true;
    };
    auto res = cli.send(req);
    if (cancel && cancel->cancelled()) return end;
    if (status == 200 && last.kind == WatchStep::Continue && !buf.empty()) handle(buf);  // a final unterminated message
    switch (last.kind) {
      case WatchStep::Stop: return end;
      case WatchStep::Compacted:
        end.compacted = true;
        end.compact_revision = last.compact_revision;
        return end;
      case WatchStep::Failed:
        if (created) return make_error("etcd %s: %s", ep.c_str(), last.error.c_str());
        errors += (errors.empty() ? "" : "; ") + ep + ": " + last.error;
        continue;  // refused before it started: another member may take it
      case WatchStep::Continue: break;
    }
    if (status == 0) {  // no answer at all
      errors += (errors.empty() ? "" : "; ") + ep + ": " + describe(res.error());
      continue;
    }
    if (status != 200) {
      json j = json::parse(buf, nullptr, /*allow_exceptions=*/false);
      std::string msg;
      if (j.is_object()) msg = json_str(j, "message").empty() ? json_str(j, "error") : json_str(j, "message");
      if (msg.empty()) msg = "HTTP " + std::to_string(status);
      if ((j.is_object() && json_i64(j, "code") == 14) || status >= 500) {
        errors += (errors.empty() ? "" : "; ") + ep + ": " + msg;
        continue;
      }
      return make_error("etcd %s: watch: %s", ep.c_str(), msg.c_str());
    }
    // The stream ended without saying why: etcd went away or the connection broke.
    return make_error("etcd %s: watch stream ended (%s)", ep.c_str(),
                      res                                   ? "closed by etcd"
                      : res.error() == httplib::Error::Read ? "connection lost"
                                                            : describe(res.error()).c_str());
  }
  return make_error("etcd unreachable (%s)", errors.c_str());
}

}  // namespace larder::cluster
