// Routing helpers shared by the HTTP front ends (`larder serve`, `larder router`), over cpp-httplib.
#pragma once
#include <httplib.h>

#include <functional>
#include <string>

namespace larder::http {

// Answers a request whose method the path does not take (405); `allow` is the one it takes.
using NotAllowed = std::function<void(const httplib::Request&, httplib::Response&, const char* allow)>;

// Registers h for GET (or POST) on path, and `not_allowed` for the other methods.
inline void route(httplib::Server& s, const char* method, const std::string& path, httplib::Server::Handler h,
                  const NotAllowed& not_allowed) {
  const std::string m = method;
  auto na = [not_allowed, method](const httplib::Request& req, httplib::Response& res) { not_allowed(req, res, method); };
  m == "GET" ? s.Get(path, h) : s.Get(path, na);
  m == "POST" ? s.Post(path, h) : s.Post(path, na);
  s.Put(path, na);
  s.Patch(path, na);
  s.Delete(path, na);
}

}  // namespace larder::http
