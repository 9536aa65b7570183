// Request/response pieces of larder_http that need no socket: targets, headers, parsing one
// request from bytes (the fuzz target's entry), serializing a response head.
#include <sys/resource.h>

#include <algorithm>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/http.hpp>
#include <cctype>
#include <cstring>

#include "http/http.h"

namespace larder::http {

namespace bhttp = boost::beast::http;

namespace {

char lower(char c) { return static_cast<char>(std::tolower(static_cast<unsigned char>(c))); }

// Header values are written verbatim: a CR or LF in one (e.g. copied from an upstream) would
// start a header of its own.
std::string clean_value(const std::string& v) {
  if (v.find_first_of("\r\n") == std::string::npos) return v;
  std::string out;
  for (char c : v) out += (c == '\r' || c == '\n') ? ' ' : c;
  return out;
}

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

bool CaseLess::operator()(const std::string& a, const std::string& b) const {
  return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end(),
                                      [](char x, char y) { return lower(x) < lower(y); });
}

bool Request::has_header(const std::string& key) const { return headers.find(key) != headers.end(); }

std::string Request::get_header_value(const std::string& key) const {
  auto it = headers.find(key);
  return it == headers.end() ? std::string() : it->second;
}

bool Response::has_header(const std::string& key) const { return headers.find(key) != headers.end(); }

std::string Response::get_header_value(const std::string& key) const {
  auto it = headers.find(key);
  return it == headers.end() ? std::string() : it->second;
}

void Response::set_header(const std::string& key, const std::string& value) {
  headers.erase(key);
  headers.emplace(key, value);
}

void Response::set_content(std::string b, const std::string& content_type) {
  body = std::move(b);
  set_header("Content-Type", content_type);
}

void Response::set_chunked_content_provider(const std::string& content_type, ContentProvider p,
                                            ContentProviderReleaser r) {
  set_header("Content-Type", content_type);
  provider = std::move(p);
  releaser = std::move(r);
}

std::string percent_decode(std::string_view s, bool plus_is_space) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); i++) {
    const char c = s[i];
    if (c == '%' && i + 2 < s.size()) {
      const int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
      if (h >= 0 && l >= 0) {
        out += static_cast<char>(h * 16 + l);
        i += 2;
        continue;
      }
    }
    out += (plus_is_space && c == '+') ? ' ' : c;
  }
  return out;
}

bool split_target(std::string_view target, std::string& path, std::multimap<std::string, std::string>& params) {
  path.clear();
  params.clear();
  if (target == "*") {
    path = "*";
    return true;
  }
  // absolute-form (what a client talking to a proxy sends): drop scheme and authority.
  if (target.size() > 7 && (target.substr(0, 7) == "http://" || target.substr(0, 8) == "https://")) {
    size_t slash = target.find('/', target.find("//") + 2);
    target = slash == std::string_view::npos ? std::string_view("/") : target.substr(slash);
  }
  if (target.empty() || target[0] != '/') return false;
  const size_t q = target.find('?');
  path = percent_decode(target.substr(0, q), false);
  if (path.find('\0') != std::string::npos) return false;
  if (q == std::string_view::npos) return true;
  std::string_view query = target.substr(q + 1);
  while (!query.empty()) {
    size_t amp = query.find('&');
    std::string_view kv = query.substr(0, amp);
    if (!kv.empty()) {
      size_t eq = kv.find('=');
      std::string k = percent_decode(kv.substr(0, eq), true);
      std::string v = eq == std::string_view::npos ? std::string() : percent_decode(kv.substr(eq + 1), true);
      params.emplace(std::move(k), std::move(v));
    }
    if (amp == std::string_view::npos) break;
    query = query.substr(amp + 1);
  }
  return true;
}

// Used by the server too (server.cpp): a parsed Beast message -> Request.
bool fill_request(bhttp::request<bhttp::string_body>&& m, Request& r) {
  r.method = std::string(m.method_string());
  r.target = std::string(m.target());
  r.version = static_cast<int>(m.version());
  if (r.method.empty() || !split_target(r.target, r.path, r.params)) return false;
  r.headers.clear();
  for (const auto& f : m) r.headers.emplace(std::string(f.name_string()), std::string(f.value()));
  r.body = std::move(m.body());
  return true;
}

int parse_request(std::string_view bytes, size_t max_header, size_t max_body, Request& req) {
  bhttp::request_parser<bhttp::string_body> p;
  p.header_limit(static_cast<std::uint32_t>(std::min<size_t>(max_header, UINT32_MAX)));
  p.body_limit(max_body);
  p.eager(true);
  boost::beast::error_code ec;
  while (!bytes.empty() && !p.is_done()) {
    size_t n = p.put(boost::asio::buffer(bytes.data(), bytes.size()), ec);
    if (ec == bhttp::error::need_more) return 1;
    if (ec == bhttp::error::header_limit) return 431;
    if (ec == bhttp::error::body_limit) return 413;
    if (ec) return 400;
    if (n == 0) break;
    bytes.remove_prefix(n);
  }
  if (!p.is_done()) return 1;
  return fill_request(p.release(), req) ? 0 : 400;
}

std::string serialize_head(const Response& res, bool head_only, bool keep_alive, int keep_alive_timeout_s,
                           bool chunked) {
  const int status = res.status > 0 ? res.status : 200;
  std::string out = "HTTP/1.1 " + std::to_string(status) + " ";
  auto reason = bhttp::obsolete_reason(static_cast<bhttp::status>(status));
  out.append(reason.data(), reason.size());
  if (reason.empty()) out += "Unknown";
  out += "\r\n";
  auto same = [](const std::string& x, const char* y) { return !CaseLess{}(x, y) && !CaseLess{}(y, x); };
  for (const auto& [k, v] : res.headers) {
    // Framing and connection headers are the server's.
    if (same(k, "Content-Length") || same(k, "Transfer-Encoding") || same(k, "Connection") || same(k, "Keep-Alive"))
      continue;
    if (k.empty() || k.find_first_of(":\r\n ") != std::string::npos) continue;
    out += k + ": " + clean_value(v) + "\r\n";
  }
  // HEAD: the length the GET would have (the body itself is not sent).
  if (chunked)
    out += "Transfer-Encoding: chunked\r\n";
  else
    out += "Content-Length: " + std::to_string(res.body.size()) + "\r\n";
  (void)head_only;
  if (keep_alive)
    out += "Connection: keep-alive\r\nKeep-Alive: timeout=" + std::to_string(keep_alive_timeout_s) + "\r\n";
  else
    out += "Connection: close\r\n";
  out += "\r\n";
  return out;
}

long raise_open_files_limit() {
  struct rlimit rl {};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 1024;
  if (rl.rlim_cur < rl.rlim_max) {
    struct rlimit want = rl;
    want.rlim_cur = rl.rlim_max == RLIM_INFINITY ? std::max<rlim_t>(rl.rlim_cur, 1 << 20) : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &want) == 0) rl = want;
  }
  return rl.rlim_cur == RLIM_INFINITY ? (1L << 20) : static_cast<long>(rl.rlim_cur);
}

}  // namespace larder::http
