// One error model for Larder: functions that can fail at a module boundary
// return Result<T>; the error carries a single human-readable line.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

namespace larder {

struct Error {
  std::string msg;
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T v) : v_(std::move(v)) {}
  Result(Error e) : v_(std::move(e)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const T& value() const& { return std::get<0>(v_); }
  T* operator->() { return &std::get<0>(v_); }
  T& operator*() { return std::get<0>(v_); }
  const std::string& error() const { return std::get<1>(v_).msg; }
  Error take_error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

// Result<void> equivalent.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error e) : err_(std::move(e.msg)), failed_(true) {}
  static Status Ok() { return Status(); }
  bool ok() const { return !failed_; }
  explicit operator bool() const { return ok(); }
  const std::string& error() const { return err_; }
  Error take_error() const { return Error{err_}; }

 private:
  std::string err_;
  bool failed_ = false;
};

template <class... Args>
Error make_error(const char* fmt, Args... args) {
  char buf[1024];
  if constexpr (sizeof...(Args) == 0) {
    std::snprintf(buf, sizeof buf, "%s", fmt);
  } else {
    std::snprintf(buf, sizeof buf, fmt, args...);
  }
  return Error{buf};
}

// Exceptions are allowed only inside loaders; they are converted at the boundary.
struct LoadError {
  std::string msg;
};

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "larder: internal invariant failed: %s (%s:%d)\n", expr, file, line);
  std::abort();
}

}  // namespace larder

// Always-on invariant check (not compiled out in Release).
#define LARDER_ASSERT(x) ((x) ? (void)0 : ::larder::assert_fail(#x, __FILE__, __LINE__))

#define LARDER_TRY(var, expr)                       \
  auto var##_res = (expr);                          \
  if (!var##_res.ok()) return var##_res.take_error(); \
  auto var = std::move(var##_res).value()

#define LARDER_CHECK_STATUS(expr)          \
  do {                                     \
    auto _st = (expr);                     \
    if (!_st.ok()) return _st.take_error(); \
  } while (0)
