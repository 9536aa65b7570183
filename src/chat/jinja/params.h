// Binds filter/method/function arguments to named parameters the way Python does.
#pragma once
#include <initializer_list>
#include <string>
#include <vector>

#include "chat/jinja/builtins.h"

namespace larder::jinja {

class Params {
 public:
  Params(const std::string& fname, const CallArgs& a, std::initializer_list<const char*> names) {
    std::vector<const char*> n(names);
    vals_.resize(n.size());
    set_.resize(n.size(), false);
    if (a.pos.size() > n.size())
      fail(fname + "() takes at most " + std::to_string(n.size()) + " argument(s) (" + std::to_string(a.pos.size()) +
           " given)");
    for (size_t k = 0; k < a.pos.size(); ++k) {
      vals_[k] = a.pos[k];
      set_[k] = true;
    }
    for (const auto& [key, v] : a.kw) {
      size_t k = 0;
      while (k < n.size() && key != n[k]) ++k;
      if (k == n.size()) fail(fname + "() got an unexpected keyword argument '" + key + "'");
      if (set_[k]) fail(fname + "() got multiple values for argument '" + key + "'");
      vals_[k] = v;
      set_[k] = true;
    }
  }
  bool has(size_t i) const { return set_[i]; }
  const Value& operator[](size_t i) const { return vals_[i]; }  // Undefined when not given
  Value get(size_t i, Value def) const { return set_[i] ? vals_[i] : def; }

 private:
  std::vector<Value> vals_;
  std::vector<bool> set_;
};

// Python int()-like argument: bools and ints; anything else is a TypeError.
inline int64_t int_arg(const Value& v, const char* what) {
  if (v.is_int_like()) return v.i();
  fail(std::string("'") + type_name(v) + "' object cannot be interpreted as an integer (" + what + ")");
}

inline const std::string& str_arg(const Value& v, const char* what) {
  if (!v.is_string()) fail(std::string(what) + " must be str, not " + type_name(v));
  return v.str();
}

}  // namespace larder::jinja
