#include "chat/jinja/value.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "chat/jinja/stack.h"
#include "chat/jinja/unicode.h"

namespace larder::jinja {

void fail(std::string msg) { throw JinjaError{std::move(msg)}; }

namespace {

const std::string kEmpty;

void check_depth(int depth, int limit = kMaxValueDepth) {
  if (depth > limit) fail("value nesting too deep (limit " + std::to_string(limit) + ")");
  if (stack_exhausted()) fail("value nesting too deep for the native stack");
}

}  // namespace

Value Value::undefined(std::string hint) {
  Value v;
  if (!hint.empty()) v.p_ = std::make_shared<std::string>(std::move(hint));
  return v;
}
Value Value::none() {
  Value v;
  v.kind_ = Kind::None;
  return v;
}
Value Value::boolean(bool b) {
  Value v;
  v.kind_ = Kind::Bool;
  v.b_ = b;
  return v;
}
Value Value::integer(int64_t i) {
  Value v;
  v.kind_ = Kind::Int;
  v.i_ = i;
  return v;
}
Value Value::number(double d) {
  Value v;
  v.kind_ = Kind::Float;
  v.f_ = d;
  return v;
}
Value Value::string(std::string s) {
  Value v;
  v.kind_ = Kind::String;
  v.p_ = std::make_shared<std::string>(std::move(s));
  return v;
}
Value Value::markup(std::string s) {
  Value v = string(std::move(s));
  v.markup_ = true;
  return v;
}
Value Value::list(std::vector<Value> items, bool tuple, bool generator) {
  auto l = std::make_shared<ListObj>();
  int d = 0;
  for (const auto& it : items) d = std::max(d, it.depth());
  check_depth(d + 1);
  l->depth = d + 1;
  l->items = std::move(items);
  l->tuple = tuple;
  l->generator = generator;
  Value v;
  v.kind_ = Kind::List;
  v.p_ = std::move(l);
  return v;
}
Value Value::dict(std::shared_ptr<DictObj> d) {
  int depth = 0;
  for (const auto& [k, val] : d->items) depth = std::max({depth, k.depth(), val.depth()});
  check_depth(depth + 1);
  d->depth = depth + 1;
  Value v;
  v.kind_ = Kind::Dict;
  v.p_ = std::move(d);
  return v;
}
Value Value::ns(std::shared_ptr<NamespaceObj> n) {
  Value v;
  v.kind_ = Kind::Namespace;
  v.p_ = std::move(n);
  return v;
}
Value Value::loop(std::shared_ptr<LoopObj> l) {
  Value v;
  v.kind_ = Kind::Loop;
  v.p_ = std::move(l);
  return v;
}
Value Value::callable(std::shared_ptr<CallableObj> c) {
  Value v;
  v.kind_ = Kind::Callable;
  v.p_ = std::move(c);
  return v;
}

const std::string& Value::undefined_hint() const {
  if (kind_ != Kind::Undefined || !p_) return kEmpty;
  return *static_cast<const std::string*>(p_.get());
}

int Value::depth() const {
  switch (kind_) {
    case Kind::List:
      return list().depth;
    case Kind::Dict:
      return dict().depth;
    case Kind::Namespace:
      return ns().depth;
    case Kind::Loop:
      return loop().items ? loop().items->depth + 1 : 1;
    default:
      return 0;
  }
}

// ---------------------------------------------------------------- containers

const Value* DictObj::find(const Value& key) const {
  auto h = hash_key(key);
  if (!h) return nullptr;
  auto it = index.find(*h);
  return it == index.end() ? nullptr : &items[it->second].second;
}

const Value* DictObj::find(const std::string& key) const {
  auto it = index.find("s" + key);
  return it == index.end() ? nullptr : &items[it->second].second;
}

void DictObj::set(Value key, Value v) {
  auto h = hash_key(key);
  if (!h) fail(std::string("unhashable type: '") + type_name(key) + "'");
  auto it = index.find(*h);
  if (it != index.end()) {
    items[it->second].second = std::move(v);  // Python keeps the first key, takes the last value
    return;
  }
  index.emplace(std::move(*h), items.size());
  items.emplace_back(std::move(key), std::move(v));
}

const Value* NamespaceObj::find(const std::string& name) const {
  for (const auto& [k, v] : attrs)
    if (k == name) return &v;
  return nullptr;
}

void NamespaceObj::set(const std::string& name, Value v) {
  int d = v.depth() + 1;
  check_depth(d);
  depth = std::max(depth, d);
  for (auto& [k, old] : attrs) {
    if (k == name) {
      old = std::move(v);
      return;
    }
  }
  attrs.emplace_back(name, std::move(v));
}

// ---------------------------------------------------------------- Python semantics

const char* type_name(const Value& v) {
  switch (v.kind()) {
    case Kind::Undefined:
      return "Undefined";
    case Kind::None:
      return "NoneType";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return "str";
    case Kind::List:
      return v.list().generator ? "generator" : v.list().tuple ? "tuple" : "list";
    case Kind::Dict:
      return "dict";
    case Kind::Namespace:
      return "Namespace";
    case Kind::Loop:
      return "LoopContext";
    case Kind::Callable:
      return "function";
  }
  return "object";
}

void fail_undefined(const Value& v) {
  const std::string& h = v.undefined_hint();
  fail(h.empty() ? "value is undefined" : h);
}

bool truthy(const Value& v) {
  switch (v.kind()) {
    case Kind::Undefined:
    case Kind::None:
      return false;
    case Kind::Bool:
      return v.b();
    case Kind::Int:
      return v.i() != 0;
    case Kind::Float:
      return v.f() != 0.0;
    case Kind::String:
      return !v.str().empty();
    case Kind::List:
      return v.list().generator || !v.list().items.empty();
    case Kind::Dict:
      return !v.dict().items.empty();
    default:
      return true;
  }
}

std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);  // shortest round-trip
  std::string s(buf, r.ptr);
  std::string out;
  if (s[0] == '-') {
    out = "-";
    s.erase(0, 1);
  }
  size_t e = s.find('e');
  int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t k = 0; k < e; ++k)
    if (s[k] != '.') digits += s[k];
  // float.__repr__: positional for 1e-4 <= |d| < 1e16, else exponent with at least 2 digits.
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      size_t intlen = static_cast<size_t>(exp) + 1;
      if (digits.size() <= intlen) {
        out += digits + std::string(intlen - digits.size(), '0') + ".0";
      } else {
        out += digits.substr(0, intlen) + "." + digits.substr(intlen);
      }
    } else {
      out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return out;
}

std::string py_str_repr(const std::string& s) {
  bool sq = s.find('\'') != std::string::npos, dq = s.find('"') != std::string::npos;
  char quote = (sq && !dq) ? '"' : '\'';
  std::string out(1, quote);
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    char buf[16];
    if (c == static_cast<uint32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else if (c < 0x7F || uni::is_printable(c)) {
      uni::append(out, c);
    } else {
      if (c <= 0xFF) {
        std::snprintf(buf, sizeof buf, "\\x%02x", c);
      } else if (c <= 0xFFFF) {
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
      } else {
        std::snprintf(buf, sizeof buf, "\\U%08x", c);
      }
      out += buf;
    }
  }
  out += quote;
  return out;
}

std::string html_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

namespace {

void str_into(std::string& out, const Value& v, int depth);

void seq_into(std::string& out, const Value& v, int depth) {
  const ListObj& l = v.list();
  if (l.generator) {
    out += "<generator object>";
    return;
  }
  out += l.tuple ? '(' : '[';
  for (size_t k = 0; k < l.items.size(); ++k) {
    if (k) out += ", ";
    repr_into(out, l.items[k], depth + 1);
  }
  if (l.tuple && l.items.size() == 1) out += ',';
  out += l.tuple ? ')' : ']';
}

void dict_into(std::string& out, const std::vector<std::pair<Value, Value>>& items, int depth) {
  out += '{';
  bool first = true;
  for (const auto& [k, v] : items) {
    if (!first) out += ", ";
    first = false;
    repr_into(out, k, depth + 1);
    out += ": ";
    repr_into(out, v, depth + 1);
  }
  out += '}';
}

void str_into(std::string& out, const Value& v, int depth) {
  check_depth(depth);
  switch (v.kind()) {
    case Kind::Undefined:
      return;
    case Kind::None:
      out += "None";
      return;
    case Kind::Bool:
      out += v.b() ? "True" : "False";
      return;
    case Kind::Int:
      out += std::to_string(v.i());
      return;
    case Kind::Float:
      out += py_float_repr(v.f());
      return;
    case Kind::String:
      out += v.str();
      return;
    case Kind::List:
      seq_into(out, v, depth);
      return;
    case Kind::Dict:
      dict_into(out, v.dict().items, depth);
      return;
    case Kind::Namespace: {
      out += "<Namespace {";
      bool first = true;
      for (const auto& [k, a] : v.ns().attrs) {
        if (!first) out += ", ";
        first = false;
        out += py_str_repr(k) + ": ";
        repr_into(out, a, depth + 1);
      }
      out += "}>";
      return;
    }
    case Kind::Loop:
      out += "<LoopContext " + std::to_string(v.loop().index0 + 1) + "/" + std::to_string(v.loop().length) + ">";
      return;
    case Kind::Callable:
      out += "<function>";
      return;
  }
}

}  // namespace

std::string to_str(const Value& v) {
  if (v.kind() == Kind::String) return v.str();
  std::string out;
  str_into(out, v, 0);
  return out;
}

void repr_into(std::string& out, const Value& v, int depth) {
  check_depth(depth);
  if (v.kind() == Kind::String) {
    if (v.is_markup()) {
      out += "Markup(" + py_str_repr(v.str()) + ")";
      return;
    }
    out += py_str_repr(v.str());
  } else if (v.kind() == Kind::Undefined) {
    out += "Undefined";
  } else {
    str_into(out, v, depth);
  }
}

bool equals(const Value& a, const Value& b, int depth) {
  check_depth(depth);
  if (a.is_number() && b.is_number()) {
    if (a.kind() == Kind::Float || b.kind() == Kind::Float) return a.f() == b.f();
    return a.i() == b.i();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case Kind::Undefined:
    case Kind::None:
      return true;
    case Kind::String:
      return a.str() == b.str();
    case Kind::List: {
      const ListObj &x = a.list(), &y = b.list();
      if (x.generator || y.generator) return a.identity() == b.identity();
      if (x.tuple != y.tuple || x.items.size() != y.items.size()) return false;
      for (size_t k = 0; k < x.items.size(); ++k)
        if (!equals(x.items[k], y.items[k], depth + 1)) return false;
      return true;
    }
    case Kind::Dict: {
      const DictObj &x = a.dict(), &y = b.dict();
      if (x.items.size() != y.items.size()) return false;
      for (const auto& [k, v] : x.items) {
        const Value* o = y.find(k);
        if (!o || !equals(v, *o, depth + 1)) return false;
      }
      return true;
    }
    default:
      return a.identity() == b.identity();
  }
}

int compare(const Value& a, const Value& b, int depth) {
  check_depth(depth);
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (a.is_number() && b.is_number()) {
    if (a.kind() == Kind::Float || b.kind() == Kind::Float) return a.f() < b.f() ? -1 : a.f() > b.f() ? 1 : 0;
    return a.i() < b.i() ? -1 : a.i() > b.i() ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_list() && b.is_list() && a.list().tuple == b.list().tuple && !a.list().generator && !b.list().generator) {
    const auto &x = a.list().items, &y = b.list().items;
    for (size_t k = 0; k < x.size() && k < y.size(); ++k) {
      if (equals(x[k], y[k], depth + 1)) continue;
      return compare(x[k], y[k], depth + 1);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  fail(std::string("'<' not supported between instances of '") + type_name(a) + "' and '" + type_name(b) + "'");
}

std::optional<std::string> hash_key(const Value& v, int depth) {
  check_depth(depth);
  switch (v.kind()) {
    case Kind::Undefined:
      return std::string("U");
    case Kind::None:
      return std::string("N");
    case Kind::Bool:
    case Kind::Int:
      return "i" + std::to_string(v.i());
    case Kind::Float: {
      double d = v.f();
      // 1 == 1.0 == True in Python, so integral floats share the int's key.
      if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.2e18)
        return "i" + std::to_string(static_cast<int64_t>(d));
      return "f" + py_float_repr(d);
    }
    case Kind::String:
      return "s" + v.str();
    case Kind::List: {
      if (!v.list().tuple || v.list().generator) return std::nullopt;
      std::string k = "t" + std::to_string(v.list().items.size());
      for (const auto& it : v.list().items) {
        auto h = hash_key(it, depth + 1);
        if (!h) return std::nullopt;
        k += ":" + std::to_string(h->size()) + ":" + *h;
      }
      return k;
    }
    case Kind::Dict:
      return std::nullopt;
    default: {
      char buf[32];
      std::snprintf(buf, sizeof buf, "p%p", v.identity());
      return std::string(buf);
    }
  }
}

// ---------------------------------------------------------------- JSON

namespace {

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    size_t start = i;
    uint32_t c = uni::next(s, i);
    char buf[16];
    switch (c) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c >= 0x10000) {
        uint32_t v = c - 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
      } else {
        std::snprintf(buf, sizeof buf, "\\u%04x", c);
      }
      out += buf;
    } else {
      out.append(s, start, i - start);
    }
  }
  out += '"';
}

std::string json_float(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  return py_float_repr(d);
}

[[noreturn]] void not_serializable(const Value& v) {
  fail(std::string("Object of type ") + type_name(v) + " is not JSON serializable");
}

void json_into(std::string& out, const Value& v, const JsonOptions& o, int level) {
  check_depth(level);
  auto newline = [&](int lv) {
    if (!o.has_indent) return;
    out += '\n';
    for (int k = 0; k < lv; ++k) out += o.indent;
  };
  switch (v.kind()) {
    case Kind::None:
      out += "null";
      return;
    case Kind::Bool:
      out += v.b() ? "true" : "false";
      return;
    case Kind::Int:
      out += std::to_string(v.i());
      return;
    case Kind::Float:
      out += json_float(v.f());
      return;
    case Kind::String:
      json_string(out, v.str(), o.ensure_ascii);
      return;
    case Kind::List: {
      if (v.list().generator) not_serializable(v);
      const auto& items = v.list().items;
      if (items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) out += o.item_sep;
        newline(level + 1);
        json_into(out, items[k], o, level + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case Kind::Dict: {
      const auto& items = v.dict().items;
      if (items.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> kv;
      kv.reserve(items.size());
      for (const auto& [k, val] : items) {
        std::string key;
        switch (k.kind()) {
          case Kind::String:
            key = k.str();
            break;
          case Kind::None:
            key = "null";
            break;
          case Kind::Bool:
            key = k.b() ? "true" : "false";
            break;
          case Kind::Int:
            key = std::to_string(k.i());
            break;
          case Kind::Float:
            key = json_float(k.f());
            break;
          default:
            fail(std::string("keys must be str, int, float, bool or None, not ") + type_name(k));
        }
        kv.emplace_back(std::move(key), &val);
      }
      if (o.sort_keys) {
        std::stable_sort(kv.begin(), kv.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      }
      out += '{';
      for (size_t k = 0; k < kv.size(); ++k) {
        if (k) out += o.item_sep;
        newline(level + 1);
        json_string(out, kv[k].first, o.ensure_ascii);
        out += o.key_sep;
        json_into(out, *kv[k].second, o, level + 1);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      not_serializable(v);
  }
}

}  // namespace

std::string to_json(const Value& v, const JsonOptions& opts) {
  std::string out;
  json_into(out, v, opts, 0);
  return out;
}

Value from_json(const nlohmann::ordered_json& j, int depth) {
  check_depth(depth + 1);
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::none();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value::integer(static_cast<int64_t>(u));
      return Value::number(static_cast<double>(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::string(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) items.push_back(from_json(e, depth + 1));
      return Value::list(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<DictObj>();
      for (const auto& [k, e] : j.items()) d->set(Value::string(k), from_json(e, depth + 1));
      return Value::dict(std::move(d));
    }
    default:
      return Value::none();
  }
}

std::vector<Value> iterate(const Value& v, size_t max_items) {
  switch (v.kind()) {
    case Kind::Undefined:
      return {};
    case Kind::List:
      return v.list().items;
    case Kind::Dict: {
      std::vector<Value> keys;
      keys.reserve(v.dict().items.size());
      for (const auto& kv : v.dict().items) keys.push_back(kv.first);
      return keys;
    }
    case Kind::String: {
      std::vector<Value> chars;
      const std::string& s = v.str();
      if (s.size() > max_items && uni::length(s) > max_items)
        fail("list exceeds " + std::to_string(max_items) + " items");
      for (size_t i = 0; i < s.size();) {
        size_t start = i;
        uni::next(s, i);
        chars.push_back(Value::string(s.substr(start, i - start)));
      }
      return chars;
    }
    default:
      fail(std::string("'") + type_name(v) + "' object is not iterable");
  }
}

}  // namespace larder::jinja
