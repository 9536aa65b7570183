// Attribute and item lookup as jinja2's sandbox does it (methods shadow dict keys for `.`,
// keys win for `[]`, misses become Undefined, mutating methods are unsafe), the methods of
// str/dict/list/loop objects, and the global functions.
#include "chat/jinja/builtins.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>

#include "chat/jinja/interpreter.h"
#include "chat/jinja/params.h"
#include "chat/jinja/pystr.h"
#include "chat/jinja/unicode.h"

namespace larder::jinja {
namespace {

const char* const kStrMethods[] = {
    "capitalize",   "casefold",   "center",    "count",       "encode",    "endswith",     "expandtabs",   "find",
    "format",       "format_map", "index",     "isalnum",     "isalpha",   "isascii",      "isdecimal",    "isdigit",
    "isidentifier", "islower",    "isnumeric", "isprintable", "isspace",   "istitle",      "isupper",      "join",
    "ljust",        "lower",      "lstrip",    "maketrans",   "partition", "removeprefix", "removesuffix", "replace",
    "rfind",        "rindex",     "rjust",     "rpartition",  "rsplit",    "rstrip",       "split",        "splitlines",
    "startswith",   "strip",      "swapcase",  "title",       "translate", "upper",        "zfill"};
const char* const kDictSafe[] = {"copy", "fromkeys", "get", "items", "keys", "values"};
const char* const kDictUnsafe[] = {"clear", "pop", "popitem", "setdefault", "update"};
const char* const kListSafe[] = {"copy", "count", "index"};
const char* const kListUnsafe[] = {"append", "clear", "extend", "insert", "pop", "remove", "reverse", "sort"};

template <size_t N>
bool one_of(const std::string& name, const char* const (&list)[N]) {
  for (const char* m : list)
    if (name == m) return true;
  return false;
}

Value method(const Value& self, const std::string& name) {
  auto c = std::make_shared<CallableObj>();
  c->type = CallableObj::Type::Method;
  c->name = name;
  c->self = self;
  return Value::callable(std::move(c));
}

std::string object_repr(const Value& obj) {
  if (obj.is_none()) return "None";
  if (obj.kind() == Kind::Namespace) return "jinja2.utils.Namespace object";
  if (obj.kind() == Kind::Loop) return "jinja2.runtime.LoopContext object";
  return std::string(type_name(obj)) + " object";
}

Value missing_attr(const Value& obj, const std::string& name) {
  return Value::undefined("'" + object_repr(obj) + "' has no attribute '" + name + "'");
}

Value unsafe(const Value& obj, const std::string& name) {
  return Value::undefined("access to attribute '" + name + "' of '" + type_name(obj) + "' object is unsafe.");
}

Value loop_attr(const Value& obj, const std::string& name) {
  const LoopObj& l = obj.loop();
  int64_t i = l.index0, n = l.length;
  if (name == "index") return Value::integer(i + 1);
  if (name == "index0") return Value::integer(i);
  if (name == "revindex") return Value::integer(n - i);
  if (name == "revindex0") return Value::integer(n - i - 1);
  if (name == "first") return Value::boolean(i == 0);
  if (name == "last") return Value::boolean(i == n - 1);
  if (name == "length") return Value::integer(n);
  if (name == "depth") return Value::integer(1);
  if (name == "depth0") return Value::integer(0);
  if (name == "previtem") {
    if (i == 0) return Value::undefined("there is no previous item");
    return l.items->items[static_cast<size_t>(i - 1)];
  }
  if (name == "nextitem") {
    if (i + 1 >= n) return Value::undefined("there is no next item");
    return l.items->items[static_cast<size_t>(i + 1)];
  }
  if (name == "cycle") return method(obj, name);
  return missing_attr(obj, name);
}

// getattr(obj, name) without dict-key lookup: methods and object attributes only.
Value attribute(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Kind::Undefined:
      fail_undefined(obj);
    case Kind::Dict:
      if (one_of(name, kDictSafe)) return method(obj, name);
      if (one_of(name, kDictUnsafe)) return unsafe(obj, name);
      break;
    case Kind::String:
      if (one_of(name, kStrMethods)) return method(obj, name);
      break;
    case Kind::List:
      if (obj.list().generator) break;
      if (obj.list().tuple) {
        if (name == "count" || name == "index") return method(obj, name);
        break;
      }
      if (one_of(name, kListSafe)) return method(obj, name);
      if (one_of(name, kListUnsafe)) return unsafe(obj, name);
      break;
    case Kind::Namespace:
      if (const Value* v = obj.ns().find(name)) return *v;
      break;
    case Kind::Loop:
      return loop_attr(obj, name);
    default:
      break;
  }
  return missing_attr(obj, name);
}

// Characters of s as code points, with a fast path for ASCII.
std::vector<uint32_t> chars_of(const std::string& s) { return uni::decode(s); }

Value str_from(const std::vector<uint32_t>& cps, size_t b, size_t e) { return Value::string(uni::encode(cps, b, e)); }

Value list_of_strings(std::vector<std::string> parts) {
  std::vector<Value> out;
  out.reserve(parts.size());
  for (auto& p : parts) out.push_back(Value::string(std::move(p)));
  return Value::list(std::move(out));
}

// Optional start/end arguments of find/startswith... as a code-point window of s.
std::string window(const std::string& s, const Params& p, size_t start_idx) {
  if (!p.has(start_idx) && !p.has(start_idx + 1)) return s;
  std::vector<uint32_t> cps = chars_of(s);
  int64_t n = static_cast<int64_t>(cps.size());
  auto clamp = [&](const Value& v, int64_t def) {
    if (!v.is_int_like()) return def;
    int64_t x = v.i();
    if (x < 0) x += n;
    return std::clamp<int64_t>(x, 0, n);
  };
  int64_t b = clamp(p[start_idx], 0), e = clamp(p[start_idx + 1], n);
  if (e < b) return std::string();
  return uni::encode(cps, static_cast<size_t>(b), static_cast<size_t>(e));
}

bool affix(const std::string& s, const Value& what, bool prefix) {
  auto one = [&](const Value& v) {
    const std::string& a = str_arg(v, prefix ? "startswith first arg" : "endswith first arg");
    if (a.size() > s.size()) return false;
    return prefix ? s.compare(0, a.size(), a) == 0 : s.compare(s.size() - a.size(), a.size(), a) == 0;
  };
  if (what.is_list() && what.list().tuple) {
    for (const auto& v : what.list().items)
      if (one(v)) return true;
    return false;
  }
  return one(what);
}

template <class Pred>
bool all_chars(const std::string& s, Pred pred) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size();)
    if (!pred(uni::next(s, i))) return false;
  return true;
}

Value str_method(Interp& in, const std::string& s, const std::string& m, CallArgs& a) {
  const std::string fname = "str." + m;
  if (m == "strip" || m == "lstrip" || m == "rstrip") {
    Params p(fname, a, {"chars"});
    return Value::string(py_strip(s, p.get(0, Value::none()), m != "rstrip", m != "lstrip"));
  }
  if (m == "split" || m == "rsplit") {
    Params p(fname, a, {"sep", "maxsplit"});
    int64_t maxsplit = p.has(1) ? int_arg(p[1], "maxsplit") : -1;
    auto parts = py_split(s, p.get(0, Value::none()), maxsplit, m == "rsplit", in.opts().max_list_items);
    in.check_list(parts.size());
    return list_of_strings(std::move(parts));
  }
  if (m == "splitlines") {
    Params p(fname, a, {"keepends"});
    auto parts = py_splitlines(s, truthy(p.get(0, Value::boolean(false))), in.opts().max_list_items);
    in.check_list(parts.size());
    return list_of_strings(std::move(parts));
  }
  if (m == "startswith" || m == "endswith") {
    Params p(fname, a, {"prefix", "start", "end"});
    if (!p.has(0)) fail(fname + "() takes at least 1 argument (0 given)");
    return Value::boolean(affix(window(s, p, 1), p[0], m == "startswith"));
  }
  if (m == "upper" || m == "lower" || m == "casefold" || m == "title" || m == "capitalize" || m == "swapcase") {
    Params p(fname, a, {});
    if (m == "upper") return Value::string(uni::upper(s));
    if (m == "lower" || m == "casefold") return Value::string(uni::lower(s));
    if (m == "title") return Value::string(py_title(s));
    if (m == "capitalize") return Value::string(py_capitalize(s));
    return Value::string(py_swapcase(s));
  }
  if (m == "replace") {
    Params p(fname, a, {"old", "new", "count"});
    if (!p.has(1)) fail("replace expected at least 2 arguments");
    int64_t count = p.has(2) ? int_arg(p[2], "count") : -1;
    return Value::string(py_replace(s, str_arg(p[0], "replace() argument 1"), str_arg(p[1], "replace() argument 2"),
                                    count, in.opts().max_output_bytes));
  }
  if (m == "find" || m == "rfind" || m == "index" || m == "rindex" || m == "count") {
    Params p(fname, a, {"sub", "start", "end"});
    if (!p.has(0)) fail(fname + "() takes at least 1 argument (0 given)");
    const std::string& sub = str_arg(p[0], "substring");
    std::string w = window(s, p, 1);
    if (m == "count") return Value::integer(py_count(w, sub));
    int64_t r = py_find(w, sub, m[0] == 'r');
    if (r < 0 && (m == "index" || m == "rindex")) fail("substring not found");
    if (r >= 0 && p.has(1)) {
      int64_t start = p[1].is_int_like() ? p[1].i() : 0;
      int64_t n = static_cast<int64_t>(uni::length(s));
      if (start < 0) start = std::max<int64_t>(0, start + n);
      r += std::min(start, n);
    }
    return Value::integer(r);
  }
  if (m == "join") {
    Params p(fname, a, {"iterable"});
    std::vector<Value> items = in.iter(p[0]);
    std::string out;
    for (size_t k = 0; k < items.size(); ++k) {
      if (!items[k].is_string())
        fail("sequence item " + std::to_string(k) + ": expected str instance, " + type_name(items[k]) + " found");
      if (k) out += s;
      out += items[k].str();
      in.check_string(out.size());
    }
    return Value::string(std::move(out));
  }
  if (m == "format") {
    std::string r = str_format(s, a);
    in.check_string(r.size());
    return Value::string(std::move(r));
  }
  if (m == "isdigit" || m == "isdecimal" || m == "isnumeric") return Value::boolean(all_chars(s, uni::is_digit));
  if (m == "isalpha") return Value::boolean(all_chars(s, uni::is_alpha));
  if (m == "isalnum")
    return Value::boolean(all_chars(s, [](uint32_t c) { return uni::is_alpha(c) || uni::is_digit(c); }));
  if (m == "isspace") return Value::boolean(all_chars(s, uni::is_space));
  if (m == "isascii") return Value::boolean(uni::is_ascii(s));
  if (m == "isupper" || m == "islower") {
    bool cased = false, ok = true;
    for (size_t i = 0; i < s.size();) {
      uint32_t c = uni::next(s, i);
      if (uni::is_upper(c)) {
        cased = true;
        if (m == "islower") ok = false;
      } else if (uni::is_lower(c)) {
        cased = true;
        if (m == "isupper") ok = false;
      }
    }
    return Value::boolean(cased && ok);
  }
  if (m == "center" || m == "ljust" || m == "rjust") {
    Params p(fname, a, {"width", "fillchar"});
    uint32_t fill = ' ';
    if (p.has(1)) {
      auto cps = chars_of(str_arg(p[1], "fillchar"));
      if (cps.size() != 1) fail("The fill character must be exactly one character long");
      fill = cps[0];
    }
    int64_t w = int_arg(p[0], "width");
    if (w > static_cast<int64_t>(in.opts().max_output_bytes)) in.check_string(SIZE_MAX);
    return Value::string(py_pad(s, w, fill, m == "center" ? '^' : m == "ljust" ? '<' : '>'));
  }
  if (m == "zfill") {
    Params p(fname, a, {"width"});
    int64_t w = int_arg(p[0], "width");
    if (w > static_cast<int64_t>(in.opts().max_output_bytes)) in.check_string(SIZE_MAX);
    int64_t len = static_cast<int64_t>(uni::length(s));
    if (w <= len) return Value::string(s);
    std::string sign, body = s;
    if (!body.empty() && (body[0] == '+' || body[0] == '-')) {
      sign = body.substr(0, 1);
      body.erase(0, 1);
    }
    return Value::string(sign + std::string(static_cast<size_t>(w - len), '0') + body);
  }
  if (m == "partition" || m == "rpartition") {
    Params p(fname, a, {"sep"});
    const std::string& sep = str_arg(p[0], "separator");
    if (sep.empty()) fail("empty separator");
    size_t f = m == "partition" ? s.find(sep) : s.rfind(sep);
    std::vector<Value> parts;
    if (f == std::string::npos) {
      Value e = Value::string("");
      parts =
          m == "partition" ? std::vector<Value>{Value::string(s), e, e} : std::vector<Value>{e, e, Value::string(s)};
    } else {
      parts = {Value::string(s.substr(0, f)), Value::string(sep), Value::string(s.substr(f + sep.size()))};
    }
    return Value::list(std::move(parts), true);
  }
  if (m == "removeprefix" || m == "removesuffix") {
    Params p(fname, a, {"affix"});
    const std::string& x = str_arg(p[0], fname.c_str());
    if (m == "removeprefix" && s.compare(0, x.size(), x) == 0) return Value::string(s.substr(x.size()));
    if (m == "removesuffix" && x.size() <= s.size() && !x.empty() && s.compare(s.size() - x.size(), x.size(), x) == 0)
      return Value::string(s.substr(0, s.size() - x.size()));
    return Value::string(s);
  }
  fail(fname + "() is not supported");
}

Value dict_method(const Value& self, const std::string& m, CallArgs& a) {
  const DictObj& d = self.dict();
  if (m == "get") {
    Params p("dict.get", a, {"key", "default"});
    if (!p.has(0)) fail("get expected at least 1 argument, got 0");
    if (!hash_key(p[0])) fail(std::string("unhashable type: '") + type_name(p[0]) + "'");
    const Value* v = d.find(p[0]);
    return v ? *v : p.get(1, Value::none());
  }
  Params p("dict." + m, a, {});
  std::vector<Value> out;
  out.reserve(d.items.size());
  if (m == "items") {
    for (const auto& [k, v] : d.items) out.push_back(Value::list({k, v}, true));
  } else if (m == "keys") {
    for (const auto& kv : d.items) out.push_back(kv.first);
  } else if (m == "values") {
    for (const auto& kv : d.items) out.push_back(kv.second);
  } else if (m == "copy") {
    return self;
  } else {
    fail("dict." + m + "() is not supported");
  }
  return Value::list(std::move(out));
}

Value list_method(const Value& self, const std::string& m, CallArgs& a) {
  const auto& items = self.list().items;
  if (m == "copy") {
    Params p("list.copy", a, {});
    return self;
  }
  Params p((self.list().tuple ? "tuple." : "list.") + m, a, {"value"});
  if (m == "count") {
    int64_t n = 0;
    for (const auto& v : items) n += equals(v, p[0]);
    return Value::integer(n);
  }
  for (size_t k = 0; k < items.size(); ++k)
    if (equals(items[k], p[0])) return Value::integer(static_cast<int64_t>(k));
  fail(std::string(self.list().tuple ? "tuple" : "list") + ".index(x): x not in " +
       (self.list().tuple ? "tuple" : "list"));
}

// ---------------------------------------------------------------- globals

Value g_range(Interp& in, CallArgs& a) {
  if (!a.kw.empty()) fail("range() takes no keyword arguments");
  if (a.pos.empty() || a.pos.size() > 3) fail("range expected 1 to 3 arguments, got " + std::to_string(a.pos.size()));
  int64_t start = 0, stop, step = 1;
  if (a.pos.size() == 1) {
    stop = int_arg(a.pos[0], "range");
  } else {
    start = int_arg(a.pos[0], "range");
    stop = int_arg(a.pos[1], "range");
    if (a.pos.size() == 3) step = int_arg(a.pos[2], "range");
  }
  if (step == 0) fail("range() arg 3 must not be zero");
  __int128 span = step > 0 ? static_cast<__int128>(stop) - start : static_cast<__int128>(start) - stop;
  __int128 astep = step > 0 ? step : -static_cast<__int128>(step);
  __int128 n = span <= 0 ? 0 : (span + astep - 1) / astep;
  // The sandbox's MAX_RANGE.
  if (n > 100000) fail("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
  in.check_list(static_cast<size_t>(n));
  std::vector<Value> out;
  out.reserve(static_cast<size_t>(n));
  for (__int128 k = 0; k < n; ++k) out.push_back(Value::integer(static_cast<int64_t>(start + k * step)));
  return Value::list(std::move(out));
}

Value g_dict(Interp& in, CallArgs& a) {
  auto d = std::make_shared<DictObj>();
  if (a.pos.size() > 1) fail("dict expected at most 1 argument, got " + std::to_string(a.pos.size()));
  if (!a.pos.empty()) {
    const Value& src = a.pos[0];
    if (src.is_dict()) {
      for (const auto& [k, v] : src.dict().items) d->set(k, v);
    } else {
      for (const Value& pair : in.iter(src)) {
        std::vector<Value> kv = in.iter(pair);
        if (kv.size() != 2)
          fail("dictionary update sequence element has length " + std::to_string(kv.size()) + "; 2 is required");
        d->set(kv[0], kv[1]);
      }
    }
  }
  for (auto& [k, v] : a.kw) d->set(Value::string(k), v);
  return Value::dict(std::move(d));
}

Value g_namespace(Interp& in, CallArgs& a) { return in.make_namespace(a); }

Value g_raise_exception(Interp& in, CallArgs& a) {
  std::string msg = a.pos.empty() ? std::string() : to_str(a.pos[0]);
  throw JinjaError{std::move(msg), true};
}

Value g_strftime_now(Interp& in, CallArgs& a) {
  Params p("strftime_now", a, {"format"});
  const std::string& fmt = str_arg(p[0], "strftime_now() format");
  auto tp = in.opts().now ? in.opts().now() : std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(tp);
  std::tm tmv{};
  localtime_r(&t, &tmv);
  auto micros = std::chrono::duration_cast<std::chrono::microseconds>(tp.time_since_epoch()).count() % 1000000;
  if (micros < 0) micros += 1000000;
  // datetime.strftime expands %f itself; the C library does the rest.
  std::string f;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] == '%' && i + 1 < fmt.size()) {
      if (fmt[i + 1] == 'f') {
        char buf[8];
        std::snprintf(buf, sizeof buf, "%06lld", static_cast<long long>(micros));
        f += buf;
      } else {
        f += fmt.substr(i, 2);
      }
      ++i;
    } else {
      f += fmt[i];
    }
  }
  f += '\x01';  // strftime returns 0 both for errors and empty output; the marker tells them apart
  std::vector<char> buf(f.size() * 4 + 256);
  for (;;) {
    size_t n = std::strftime(buf.data(), buf.size(), f.c_str(), &tmv);
    if (n > 0) return Value::string(std::string(buf.data(), n - 1));
    if (buf.size() > (1u << 20)) fail("strftime_now() result too large");
    buf.resize(buf.size() * 4);
  }
}

void def(Scope& g, const char* name, BuiltinFn fn) {
  auto c = std::make_shared<CallableObj>();
  c->type = CallableObj::Type::Builtin;
  c->name = name;
  c->builtin = fn;
  g.vars[name] = Value::callable(std::move(c));
}

// Markup methods that return Markup; join/format also escape what they take in.
const char* const kMarkupMethods[] = {"capitalize",   "center",    "expandtabs", "format",     "join",
                                      "ljust",        "lower",     "lstrip",     "partition",  "removeprefix",
                                      "removesuffix", "replace",   "rjust",      "rpartition", "rsplit",
                                      "rstrip",       "split",     "splitlines", "strip",      "swapcase",
                                      "title",        "translate", "upper",      "zfill",      "casefold"};

Value as_markup(const Value& v) {
  if (v.is_string()) return v.is_markup() ? v : Value::markup(v.str());
  if (v.is_list()) {
    std::vector<Value> items;
    for (const auto& it : v.list().items) items.push_back(as_markup(it));
    return Value::list(std::move(items), v.list().tuple);
  }
  return v;
}

Value escape_arg(const Value& v) {
  if (v.is_string() && !v.is_markup()) return Value::markup(html_escape(v.str()));
  return v;
}

Value markup_method(Interp& in, const Value& self, const std::string& m, CallArgs& args) {
  if (m == "join" || m == "format") {
    for (auto& v : args.pos) {
      if (m == "join" && v.is_list()) {
        std::vector<Value> items;
        for (const auto& it : v.list().items) items.push_back(escape_arg(it));
        v = Value::list(std::move(items), v.list().tuple);
      } else {
        v = escape_arg(v);
      }
    }
    for (auto& kv : args.kw) kv.second = escape_arg(kv.second);
  }
  Value r = str_method(in, self.str(), m, args);
  return one_of(m, kMarkupMethods) ? as_markup(r) : r;
}

}  // namespace

Value get_attr(Interp& in, const Value& obj, const std::string& name) {
  if (obj.is_dict()) {
    if (one_of(name, kDictSafe)) return method(obj, name);
    if (one_of(name, kDictUnsafe)) return unsafe(obj, name);
    if (const Value* v = obj.dict().find(name)) return *v;
    return missing_attr(obj, name);
  }
  return attribute(obj, name);
}

Value get_item(Interp& in, const Value& obj, const Value& key) {
  switch (obj.kind()) {
    case Kind::Undefined:
      fail_undefined(obj);
    case Kind::Dict:
      if (hash_key(key))
        if (const Value* v = obj.dict().find(key)) return *v;
      break;
    case Kind::List:
      if (!obj.list().generator && key.is_int_like()) {
        const auto& items = obj.list().items;
        int64_t i = key.i(), n = static_cast<int64_t>(items.size());
        if (i < 0) i += n;
        if (i >= 0 && i < n) return items[static_cast<size_t>(i)];
        return Value::undefined("'" + object_repr(obj) + "' has no element " + std::to_string(key.i()));
      }
      break;
    case Kind::String:
      if (key.is_int_like()) {
        const std::string& s = obj.str();
        in.tick(s.size() / 16);  // code-point indexing decodes the string
        int64_t i = key.i();
        if (uni::is_ascii(s)) {
          int64_t n = static_cast<int64_t>(s.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return Value::string(std::string(1, s[static_cast<size_t>(i)]));
        } else {
          auto cps = chars_of(s);
          int64_t n = static_cast<int64_t>(cps.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return str_from(cps, static_cast<size_t>(i), static_cast<size_t>(i) + 1);
        }
        return Value::undefined("'str object' has no element " + std::to_string(key.i()));
      }
      break;
    default:
      break;
  }
  if (key.is_string()) return attribute(obj, key.str());
  return Value::undefined("'" + object_repr(obj) + "' has no element " + to_str(key));
}

Value get_slice(Interp& in, const Value& obj, const Value& start, const Value& stop, const Value& step) {
  if (obj.is_undefined()) fail_undefined(obj);
  auto idx = [](const Value& v, bool& ok) -> std::optional<int64_t> {
    if (v.is_none()) return std::nullopt;
    if (v.is_int_like()) return v.i();
    ok = false;
    return std::nullopt;
  };
  bool ok = true;
  auto b = idx(start, ok), e = idx(stop, ok), st = idx(step, ok);
  // jinja2 compiles slices to a plain Python subscript (no sandbox getitem), so they raise.
  bool seq = obj.is_string() || (obj.is_list() && !obj.list().generator);
  if (obj.is_dict()) fail("unhashable type: 'slice'");
  if (!seq) fail(std::string("'") + type_name(obj) + "' object is not subscriptable");
  if (!ok) fail("slice indices must be integers or None or have an __index__ method");
  int64_t s = st.value_or(1);
  if (s == 0) fail("slice step cannot be zero");
  std::vector<uint32_t> cps;
  if (obj.is_string()) {
    in.tick(obj.str().size() / 16);
    cps = chars_of(obj.str());
  }
  int64_t n = obj.is_string() ? static_cast<int64_t>(cps.size()) : static_cast<int64_t>(obj.list().items.size());
  auto adjust = [&](std::optional<int64_t> v, int64_t def) {
    if (!v) return def;
    int64_t x = *v;
    if (x < 0) {
      x = x < -n ? (s < 0 ? -1 : 0) : x + n;
    } else if (x >= n) {
      x = s < 0 ? n - 1 : n;
    }
    return x;
  };
  int64_t lo = adjust(b, s < 0 ? n - 1 : 0), hi = adjust(e, s < 0 ? -1 : n);
  int64_t count = 0;
  if (s > 0 && hi > lo) count = (hi - lo - 1) / s + 1;
  if (s < 0 && lo > hi) count = s == INT64_MIN ? 1 : (lo - hi - 1) / (-s) + 1;
  in.tick(static_cast<uint64_t>(count) / 16);
  if (obj.is_string()) {
    std::string out;
    for (int64_t k = 0; k < count; ++k) uni::append(out, cps[static_cast<size_t>(lo + k * s)]);
    return obj.is_markup() ? Value::markup(std::move(out)) : Value::string(std::move(out));
  }
  const auto& items = obj.list().items;
  std::vector<Value> out;
  out.reserve(static_cast<size_t>(count));
  for (int64_t k = 0; k < count; ++k) out.push_back(items[static_cast<size_t>(lo + k * s)]);
  return Value::list(std::move(out), obj.list().tuple);
}

Value call_method(Interp& in, const CallableObj& m, CallArgs& args) {
  const Value& self = m.self;
  if (self.is_string()) in.tick(self.str().size() / 16);  // str methods are linear in the string
  switch (self.kind()) {
    case Kind::String:
      if (self.is_markup()) return markup_method(in, self, m.name, args);
      return str_method(in, self.str(), m.name, args);
    case Kind::Dict:
      return dict_method(self, m.name, args);
    case Kind::List:
      return list_method(self, m.name, args);
    case Kind::Loop: {
      if (!args.kw.empty()) fail("loop.cycle() takes no keyword arguments");
      if (args.pos.empty()) fail("no items for cycling given");
      return args.pos[static_cast<size_t>(self.loop().index0) % args.pos.size()];
    }
    default:
      fail("'" + m.name + "' is not callable");
  }
}

void install_globals(Scope& g) {
  def(g, "range", g_range);
  def(g, "dict", g_dict);
  def(g, "namespace", g_namespace);
  def(g, "raise_exception", g_raise_exception);
  def(g, "strftime_now", g_strftime_now);
}

}  // namespace larder::jinja
