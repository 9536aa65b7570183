// The HTTP layer's request parsing (Beast's parser plus our target/header handling) and the
// OpenAI request validation behind it: what every client of `larder serve` and the router can
// send. Input: raw bytes of a request; its body (or, failing a request, the whole input) also
// goes through the completions and chat validators as JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "http/http.h"
#include "server/openai_api.h"

namespace {

void validate(std::string_view body) {
  using larder::server::ojson;
  ojson j = ojson::parse(body.begin(), body.end(), nullptr, false);
  if (j.is_discarded()) return;
  larder::server::ParsedRequest a, b;
  if (auto e = larder::server::parse_completion_request(j, a)) larder::server::dump_json(larder::server::error_body(*e));
  if (auto e = larder::server::parse_chat_request(j, b)) larder::server::dump_json(larder::server::error_body(*e));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  larder::http::Request req;
  const int rc = larder::http::parse_request(in, 2048, 16384, req);
  if (rc != 0 && rc != 1 && rc != 400 && rc != 413 && rc != 431) std::abort();
  if (rc == 0) {
    if (req.path.empty() || (req.path[0] != '/' && req.path != "*")) std::abort();
    if (req.path.find('\0') != std::string::npos) std::abort();
    // Whatever a client sent, echoed into a response header, stays one header line.
    larder::http::Response res;
    res.status = 200;
    res.set_header("X-Echo", req.path + req.get_header_value("User-Agent") + req.target);
    res.set_content(req.body, "application/json");
    const std::string head = larder::http::serialize_head(res, false, true, 30, false);
    size_t lines = 0;
    for (size_t p = head.find("\r\n"); p != std::string::npos; p = head.find("\r\n", p + 2)) lines++;
    // status, X-Echo, Content-Type, Content-Length, Connection, Keep-Alive, and the empty line
    if (lines != 7) std::abort();
    validate(req.body);
  } else {
    validate(in);
  }
  std::string path;
  std::multimap<std::string, std::string> params;
  larder::http::split_target(in, path, params);
  return 0;
}
