// Descriptor strings and peer addresses of the transfer engine (see wire.h).
#include "transfer/wire.h"

#include <netdb.h>

#include <cstdlib>
#include <cstring>

namespace larder::transfer::wire {

namespace {

constexpr const char* kDescTag = "lxd1.";

uint64_t fnv1a64(const uint8_t* p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

std::string b64_encode(const std::string& in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  auto u = [&](size_t k) { return static_cast<uint32_t>(static_cast<uint8_t>(in[k])); };
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = (u(i) << 16) | (u(i + 1) << 8) | u(i + 2);
    for (int s = 18; s >= 0; s -= 6) out += kB64[(v >> s) & 63];
  }
  if (size_t r = in.size() - i) {
    uint32_t v = (u(i) << 16) | (r == 2 ? u(i + 1) << 8 : 0);
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    if (r == 2) out += kB64[(v >> 6) & 63];
  }
  return out;
}

bool b64_decode(const std::string& in, size_t from, std::string* out) {
  int8_t map[256];
  std::memset(map, -1, sizeof map);
  for (int i = 0; i < 64; i++) map[static_cast<uint8_t>(kB64[i])] = static_cast<int8_t>(i);
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = from; i < in.size(); i++) {
    int8_t v = map[static_cast<uint8_t>(in[i])];
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      *out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  // A lone trailing character is never valid, and unused low bits must be zero: one string per
  // descriptor.
  return bits < 6 && (acc & ((1u << bits) - 1)) == 0;
}

}  // namespace

std::string encode_desc(uint64_t base, uint64_t size, const void* rkey, size_t rkey_len) {
  std::string b;
  auto put = [&](const void* p, size_t n) { b.append(static_cast<const char*>(p), n); };
  uint32_t len = static_cast<uint32_t>(rkey_len);
  put(&base, 8);
  put(&size, 8);
  put(&len, 4);
  put(rkey, rkey_len);
  uint64_t h = fnv1a64(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  put(&h, 8);
  return kDescTag + b64_encode(b);
}

Result<Desc> decode_desc(const std::string& s) {
  size_t tag = std::strlen(kDescTag);
  if (s.compare(0, tag, kDescTag) != 0) return make_error("remote_desc is not a Larder transfer descriptor (no '%s' tag)", kDescTag);
  std::string b;
  if (!b64_decode(s, tag, &b)) return make_error("remote_desc is corrupt (bad base64)");
  if (b.size() < 28) return make_error("remote_desc is corrupt (truncated)");
  Desc d;
  uint32_t len;
  std::memcpy(&d.base, b.data(), 8);
  std::memcpy(&d.size, b.data() + 8, 8);
  std::memcpy(&len, b.data() + 16, 4);
  if (b.size() != 28ull + len) return make_error("remote_desc is corrupt (length mismatch)");
  uint64_t h;
  std::memcpy(&h, b.data() + 20 + len, 8);
  if (h != fnv1a64(reinterpret_cast<const uint8_t*>(b.data()), 20 + len)) return make_error("remote_desc is corrupt (checksum mismatch)");
  d.rkey = b.substr(20, len);
  return d;
}

Result<sockaddr_storage> resolve(const std::string& host, int port, bool passive, socklen_t* len) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  std::string ps = std::to_string(port);
  int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), ps.c_str(), &hints, &res);
  if (rc != 0 || !res) return make_error("cannot resolve '%s': %s", host.c_str(), gai_strerror(rc));
  sockaddr_storage ss{};
  std::memcpy(&ss, res->ai_addr, res->ai_addrlen);
  *len = res->ai_addrlen;
  freeaddrinfo(res);
  return ss;
}

bool split_address(const std::string& a, std::string* host, int* port) {
  size_t c = a.rfind(':');
  if (c == std::string::npos || c + 1 >= a.size()) return false;
  *host = a.substr(0, c);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  char* end = nullptr;
  long p = std::strtol(a.c_str() + c + 1, &end, 10);
  if (*end != 0 || p <= 0 || p > 65535 || host->empty()) return false;
  *port = static_cast<int>(p);
  return true;
}

}  // namespace larder::transfer::wire
