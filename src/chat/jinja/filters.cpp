// jinja2's built-in filters and tests (jinja2/filters.py, jinja2/tests.py) with autoescape off,
// plus transformers' tojson. Filters that return generators in jinja2 (map, select*, reject*,
// unique, items, reverse) return lists flagged as generators: no len(), always truthy.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <unordered_set>

#include "chat/jinja/builtins.h"
#include "chat/jinja/interpreter.h"
#include "chat/jinja/params.h"
#include "chat/jinja/pystr.h"
#include "chat/jinja/unicode.h"

namespace larder::jinja {
namespace {

using Args = CallArgs;

Value generator(std::vector<Value> items) { return Value::list(std::move(items), false, true); }

Value lower_if_str(const Value& v) { return v.is_string() ? Value::string(uni::lower(v.str())) : v; }

// make_attrgetter: "a.b.0" looks up a, then b, then index 0 with environment.getitem.
std::vector<Value> attr_parts(const Value& attribute) {
  std::vector<Value> parts;
  if (attribute.is_none() || attribute.is_undefined()) return parts;
  if (!attribute.is_string()) return {attribute};
  const std::string& s = attribute.str();
  size_t start = 0;
  for (;;) {
    size_t dot = s.find('.', start);
    std::string p = s.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!p.empty() && p.find_first_not_of("0123456789") == std::string::npos && p.size() < 18) {
      parts.push_back(Value::integer(std::stoll(p)));
    } else {
      parts.push_back(Value::string(p));
    }
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

struct AttrGetter {
  std::vector<Value> parts;
  Value def;  // used for undefined results when not none/undefined
  bool lower = false;
  Value operator()(Interp& in, const Value& item) const {
    Value cur = item;
    for (const Value& p : parts) {
      cur = get_item(in, cur, p);
      if (cur.is_undefined() && !def.is_none() && !def.is_undefined()) cur = def;
    }
    return lower ? lower_if_str(cur) : cur;
  }
};

AttrGetter attrgetter(const Value& attribute, bool lower = false, Value def = Value::none()) {
  return AttrGetter{attr_parts(attribute), std::move(def), lower};
}

// make_multi_attrgetter: "a,b" gives a list key [item.a, item.b].
std::vector<AttrGetter> multi_attrgetter(const Value& attribute, bool lower) {
  std::vector<AttrGetter> out;
  if (attribute.is_string()) {
    const std::string& s = attribute.str();
    size_t start = 0;
    for (;;) {
      size_t comma = s.find(',', start);
      out.push_back(attrgetter(
          Value::string(s.substr(start, comma == std::string::npos ? std::string::npos : comma - start)), lower));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  } else {
    out.push_back(attrgetter(attribute, lower));
  }
  return out;
}

int64_t py_len(const Value& v) {
  switch (v.kind()) {
    case Kind::Undefined:
      return 0;
    case Kind::String:
      return static_cast<int64_t>(uni::length(v.str()));
    case Kind::List:
      if (v.list().generator) break;
      return static_cast<int64_t>(v.list().items.size());
    case Kind::Dict:
      return static_cast<int64_t>(v.dict().items.size());
    default:
      break;
  }
  fail(std::string("object of type '") + type_name(v) + "' has no len()");
}

std::string soft_str(const Value& v) { return to_str(v); }

// Filters built on soft_str(...).method() keep a Markup input Markup.
Value same_kind(const Value& in, std::string s) {
  return in.is_markup() ? Value::markup(std::move(s)) : Value::string(std::move(s));
}

// ---------------------------------------------------------------- filters

Value f_abs(Interp& in, const Value& v, Args& a) {
  Params p("abs", a, {});
  if (v.is_int_like()) {
    if (v.i() == INT64_MIN) fail("integer overflow");
    return Value::integer(v.i() < 0 ? -v.i() : v.i());
  }
  if (v.kind() == Kind::Float) return Value::number(std::fabs(v.f()));
  if (v.is_undefined()) fail_undefined(v);
  fail(std::string("bad operand type for abs(): '") + type_name(v) + "'");
}

Value f_attr(Interp& in, const Value& v, Args& a) {
  Params p("attr", a, {"name"});
  if (!p[0].is_string()) return Value::undefined("attribute name must be a string");
  if (v.is_dict()) {  // |attr never falls back to dict keys
    Value m = get_attr(in, v, p[0].str());
    if (m.kind() == Kind::Callable) return m;
    return Value::undefined("'dict object' has no attribute '" + p[0].str() + "'");
  }
  return get_attr(in, v, p[0].str());
}

Value f_capitalize(Interp& in, const Value& v, Args& a) {
  Params p("capitalize", a, {});
  return same_kind(v, py_capitalize(soft_str(v)));
}

Value f_center(Interp& in, const Value& v, Args& a) {
  Params p("center", a, {"width"});
  int64_t w = p.has(0) ? int_arg(p[0], "width") : 80;
  if (w > static_cast<int64_t>(in.opts().max_output_bytes)) in.check_string(SIZE_MAX);
  return same_kind(v, py_pad(soft_str(v), w, ' ', '^'));
}

Value f_default(Interp& in, const Value& v, Args& a) {
  Params p("default", a, {"default_value", "boolean"});
  if (v.is_undefined() || (truthy(p.get(1, Value::boolean(false))) && !truthy(v))) return p.get(0, Value::string(""));
  return v;
}

Value f_dictsort(Interp& in, const Value& v, Args& a) {
  Params p("dictsort", a, {"case_sensitive", "by", "reverse"});
  bool cs = truthy(p.get(0, Value::boolean(false)));
  std::string by = p.has(1) ? to_str(p[1]) : "key";
  if (by != "key" && by != "value") fail("You can only sort by either \"key\" or \"value\"");
  bool rev = truthy(p.get(2, Value::boolean(false)));
  if (!v.is_dict()) fail(std::string("'") + type_name(v) + "' object has no attribute 'items'");
  std::vector<std::pair<Value, Value>> items = v.dict().items;
  size_t pos = by == "key" ? 0 : 1;
  auto key = [&](const std::pair<Value, Value>& kv) {
    return cs ? (pos ? kv.second : kv.first) : lower_if_str(pos ? kv.second : kv.first);
  };
  std::stable_sort(items.begin(), items.end(), [&](const auto& x, const auto& y) {
    return rev ? compare(key(y), key(x)) < 0 : compare(key(x), key(y)) < 0;
  });
  std::vector<Value> out;
  for (auto& [k, val] : items) out.push_back(Value::list({k, val}, true));
  return Value::list(std::move(out));
}

Value f_escape(Interp& in, const Value& v, Args& a) {
  Params p("escape", a, {});
  if (v.is_markup()) return v;
  std::string r = html_escape(soft_str(v));
  in.check_string(r.size());
  return Value::markup(std::move(r));
}

Value f_forceescape(Interp& in, const Value& v, Args& a) {
  Params p("forceescape", a, {});
  std::string r = html_escape(soft_str(v));
  in.check_string(r.size());
  return Value::markup(std::move(r));
}

Value f_first(Interp& in, const Value& v, Args& a) {
  Params p("first", a, {});
  if (v.is_string()) {
    if (v.str().empty()) return Value::undefined("No first item, sequence was empty.");
    size_t i = 0;
    uni::next(v.str(), i);
    return Value::string(v.str().substr(0, i));
  }
  if (v.is_dict()) {
    if (v.dict().items.empty()) return Value::undefined("No first item, sequence was empty.");
    return v.dict().items.front().first;
  }
  std::vector<Value> items = in.iter(v);
  if (items.empty()) return Value::undefined("No first item, sequence was empty.");
  return items.front();
}

Value f_last(Interp& in, const Value& v, Args& a) {
  Params p("last", a, {});
  if (v.is_list() && v.list().generator) fail("'generator' object is not reversible");
  std::vector<Value> items = in.iter(v);
  if (items.empty()) return Value::undefined("No last item, sequence was empty.");
  return items.back();
}

Value f_float(Interp& in, const Value& v, Args& a) {
  Params p("float", a, {"default"});
  Value def = p.get(0, Value::number(0.0));
  if (v.kind() == Kind::Float) return v;
  if (v.is_int_like()) return Value::number(static_cast<double>(v.i()));
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_string()) {
    if (auto d = py_parse_float(v.str())) return Value::number(*d);
  }
  return def;
}

Value f_int(Interp& in, const Value& v, Args& a) {
  Params p("int", a, {"default", "base"});
  Value def = p.get(0, Value::integer(0));
  int base = p.has(1) ? static_cast<int>(int_arg(p[1], "base")) : 10;
  if (v.is_int_like()) return Value::integer(v.i());
  if (v.kind() == Kind::Float) {
    double d = v.f();
    if (std::isnan(d)) return def;
    if (std::isinf(d)) fail("cannot convert float infinity to integer");
    if (std::fabs(d) >= 9.2233720368547758e18) fail("integer overflow");
    return Value::integer(static_cast<int64_t>(d));
  }
  if (v.is_undefined()) fail_undefined(v);
  if (v.is_string()) {
    if (auto i = py_parse_int(v.str(), base)) return Value::integer(*i);
    if (auto d = py_parse_float(v.str())) {  // "42.23"|int gives 42
      if (std::isnan(*d)) return def;
      if (std::isinf(*d)) fail("cannot convert float infinity to integer");
      if (std::fabs(*d) >= 9.2233720368547758e18) fail("integer overflow");
      return Value::integer(static_cast<int64_t>(*d));
    }
  }
  return def;
}

Value f_format(Interp& in, const Value& v, Args& a) {
  if (!a.pos.empty() && !a.kw.empty()) fail("can't handle positional and keyword arguments at the same time");
  Value args;
  if (!a.kw.empty()) {
    auto d = std::make_shared<DictObj>();
    for (auto& [k, x] : a.kw) d->set(Value::string(k), x);
    args = Value::dict(std::move(d));
  } else {
    args = Value::list(a.pos, true);
  }
  std::string r = percent_format(soft_str(v), args);
  in.check_string(r.size());
  return Value::string(std::move(r));
}

Value f_indent(Interp& in, const Value& v, Args& a) {
  Params p("indent", a, {"width", "first", "blank"});
  if (!v.is_string()) fail(std::string("unsupported operand type(s) for +=: '") + type_name(v) + "' and 'str'");
  std::string ind;
  Value w = p.get(0, Value::integer(4));
  if (w.is_string()) {
    ind = w.str();
  } else {
    int64_t n = int_arg(w, "width");
    if (n > static_cast<int64_t>(in.opts().max_output_bytes)) in.check_string(SIZE_MAX);
    ind.assign(static_cast<size_t>(std::max<int64_t>(n, 0)), ' ');
  }
  std::vector<std::string> lines = py_splitlines(v.str() + "\n", false);
  std::string rv;
  if (truthy(p.get(2, Value::boolean(false)))) {
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k) rv += "\n" + ind;
      rv += lines[k];
      in.check_string(rv.size());
    }
  } else {
    rv = lines.empty() ? std::string() : lines[0];
    for (size_t k = 1; k < lines.size(); ++k) {
      rv += "\n";
      if (!lines[k].empty()) rv += ind;
      rv += lines[k];
      in.check_string(rv.size());
    }
  }
  if (truthy(p.get(1, Value::boolean(false)))) rv = ind + rv;
  in.check_string(rv.size());
  return same_kind(v, std::move(rv));
}

Value f_items(Interp& in, const Value& v, Args& a) {
  Params p("items", a, {});
  if (v.is_undefined()) return generator({});
  if (!v.is_dict()) fail("Can only get item pairs from a mapping.");
  std::vector<Value> out;
  for (const auto& [k, x] : v.dict().items) out.push_back(Value::list({k, x}, true));
  return generator(std::move(out));
}

Value f_join(Interp& in, const Value& v, Args& a) {
  Params p("join", a, {"d", "attribute"});
  std::string d = p.has(0) ? soft_str(p[0]) : std::string();
  std::vector<Value> items = in.iter(v);
  AttrGetter get = attrgetter(p.get(1, Value::none()));
  std::string out;
  for (size_t k = 0; k < items.size(); ++k) {
    in.tick();
    if (k) out += d;
    out += soft_str(get.parts.empty() ? items[k] : get(in, items[k]));
    in.check_string(out.size());
  }
  return Value::string(std::move(out));
}

Value f_length(Interp& in, const Value& v, Args& a) {
  Params p("length", a, {});
  return Value::integer(py_len(v));
}

Value f_list(Interp& in, const Value& v, Args& a) {
  Params p("list", a, {});
  std::vector<Value> items = in.iter(v);
  in.check_list(items.size());
  return Value::list(std::move(items));
}

Value f_lower(Interp& in, const Value& v, Args& a) {
  Params p("lower", a, {});
  return same_kind(v, uni::lower(soft_str(v)));
}

Value f_upper(Interp& in, const Value& v, Args& a) {
  Params p("upper", a, {});
  return same_kind(v, uni::upper(soft_str(v)));
}

Value f_map(Interp& in, const Value& v, Args& a) {
  if (!truthy(v)) return generator({});  // jinja2: `if value:` guards the loop
  std::vector<Value> items = in.iter(v);
  std::vector<Value> out;
  out.reserve(items.size());
  bool by_attr =
      a.pos.empty() && std::any_of(a.kw.begin(), a.kw.end(), [](const auto& kv) { return kv.first == "attribute"; });
  if (by_attr) {
    Value attribute, def = Value::none();
    for (auto& [k, x] : a.kw) {
      if (k == "attribute") {
        attribute = x;
      } else if (k == "default") {
        def = x;
      } else {
        fail("Unexpected keyword argument '" + k + "'");
      }
    }
    AttrGetter get = attrgetter(attribute, false, def);
    for (const auto& it : items) {
      in.tick();
      out.push_back(get(in, it));
    }
    return generator(std::move(out));
  }
  if (a.pos.empty()) fail("map requires a filter argument");
  std::string name = soft_str(a.pos[0]);
  CallArgs rest;
  rest.pos.assign(a.pos.begin() + 1, a.pos.end());
  rest.kw = a.kw;
  for (const auto& it : items) {
    in.tick();
    CallArgs copy = rest;
    out.push_back(in.run_filter(name, it, copy));
  }
  return generator(std::move(out));
}

Value min_max(Interp& in, const Value& v, Args& a, bool want_max, const char* name) {
  Params p(name, a, {"case_sensitive", "attribute"});
  std::vector<Value> items = in.iter(v);
  if (items.empty()) return Value::undefined("No aggregated item, sequence was empty.");
  AttrGetter key = attrgetter(p.get(1, Value::none()), !truthy(p.get(0, Value::boolean(false))));
  size_t best = 0;
  Value best_key = key(in, items[0]);
  for (size_t k = 1; k < items.size(); ++k) {
    in.tick();
    Value kk = key(in, items[k]);
    int c = compare(kk, best_key);
    if (want_max ? c > 0 : c < 0) {
      best = k;
      best_key = kk;
    }
  }
  return items[best];
}

Value f_max(Interp& in, const Value& v, Args& a) { return min_max(in, v, a, true, "max"); }
Value f_min(Interp& in, const Value& v, Args& a) { return min_max(in, v, a, false, "min"); }

Value f_pprint(Interp& in, const Value& v, Args& a) {
  Params p("pprint", a, {});
  std::string r;
  repr_into(r, v);
  return Value::string(std::move(r));
}

Value f_replace(Interp& in, const Value& v, Args& a) {
  Params p("replace", a, {"old", "new", "count"});
  if (!p.has(1)) fail("replace() missing required argument 'new'");
  int64_t count = p.has(2) && !p[2].is_none() ? int_arg(p[2], "count") : -1;
  return Value::string(py_replace(soft_str(v), soft_str(p[0]), soft_str(p[1]), count, in.opts().max_output_bytes));
}

Value f_reverse(Interp& in, const Value& v, Args& a) {
  Params p("reverse", a, {});
  if (v.is_string()) {
    auto cps = uni::decode(v.str());
    std::reverse(cps.begin(), cps.end());
    return Value::string(uni::encode(cps));
  }
  std::vector<Value> items = in.iter(v);
  std::reverse(items.begin(), items.end());
  return generator(std::move(items));
}

Value f_round(Interp& in, const Value& v, Args& a) {
  Params p("round", a, {"precision", "method"});
  int64_t prec = p.has(0) ? int_arg(p[0], "precision") : 0;
  std::string method = p.has(1) ? soft_str(p[1]) : "common";
  if (method != "common" && method != "ceil" && method != "floor") fail("method must be common, ceil or floor");
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_number()) fail(std::string("type ") + type_name(v) + " doesn't define __round__ method");
  prec = std::clamp<int64_t>(prec, -400, 400);
  if (method == "common") {
    if (v.is_int_like()) {
      if (prec >= 0) return Value::integer(v.i());
      double scale = std::pow(10.0, static_cast<double>(-prec));
      return Value::integer(static_cast<int64_t>(std::nearbyint(static_cast<double>(v.i()) / scale) * scale));
    }
    double d = v.f();
    if (!std::isfinite(d)) return v;
    if (prec >= 0) {
      // printf rounds the exact binary value half-to-even, which is what round() does.
      char buf[512];
      std::snprintf(buf, sizeof buf, "%.*f", static_cast<int>(std::min<int64_t>(prec, 340)), d);
      return Value::number(std::strtod(buf, nullptr));
    }
    double scale = std::pow(10.0, static_cast<double>(-prec));
    return Value::number(std::nearbyint(d / scale) * scale);
  }
  double scale = std::pow(10.0, static_cast<double>(prec));
  double x = v.f() * scale;
  return Value::number((method == "ceil" ? std::ceil(x) : std::floor(x)) / scale);
}

Value f_safe(Interp& in, const Value& v, Args& a) {
  Params p("safe", a, {});
  return v.is_markup() ? v : Value::markup(soft_str(v));
}

Value select_impl(Interp& in, const Value& v, Args& a, bool keep, bool by_attr) {
  if (!truthy(v)) return generator({});
  std::vector<Value> items = in.iter(v);
  size_t off = 0;
  AttrGetter get;
  if (by_attr) {
    if (a.pos.empty()) fail("Missing parameter for attribute name");
    get = attrgetter(a.pos[0]);
    off = 1;
  }
  bool has_test = a.pos.size() > off;
  std::string test = has_test ? soft_str(a.pos[off]) : std::string();
  CallArgs rest;
  if (has_test) rest.pos.assign(a.pos.begin() + off + 1, a.pos.end());
  rest.kw = a.kw;
  std::vector<Value> out;
  for (const auto& it : items) {
    in.tick();
    Value x = by_attr ? get(in, it) : it;
    bool r;
    if (has_test) {
      CallArgs copy = rest;
      r = in.run_test(test, x, copy);
    } else {
      r = truthy(x);
    }
    if (r == keep) out.push_back(it);
  }
  return generator(std::move(out));
}

Value f_select(Interp& in, const Value& v, Args& a) { return select_impl(in, v, a, true, false); }
Value f_reject(Interp& in, const Value& v, Args& a) { return select_impl(in, v, a, false, false); }
Value f_selectattr(Interp& in, const Value& v, Args& a) { return select_impl(in, v, a, true, true); }
Value f_rejectattr(Interp& in, const Value& v, Args& a) { return select_impl(in, v, a, false, true); }

Value f_sort(Interp& in, const Value& v, Args& a) {
  Params p("sort", a, {"reverse", "case_sensitive", "attribute"});
  bool rev = truthy(p.get(0, Value::boolean(false)));
  auto getters = multi_attrgetter(p.get(2, Value::none()), !truthy(p.get(1, Value::boolean(false))));
  std::vector<Value> items = in.iter(v);
  in.check_list(items.size());
  std::vector<std::pair<Value, Value>> keyed;
  keyed.reserve(items.size());
  for (auto& it : items) {
    std::vector<Value> key;
    for (const auto& g : getters) key.push_back(g(in, it));
    keyed.emplace_back(Value::list(std::move(key)), std::move(it));
  }
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    in.tick();
    return rev ? compare(y.first, x.first) < 0 : compare(x.first, y.first) < 0;
  });
  std::vector<Value> out;
  for (auto& kv : keyed) out.push_back(std::move(kv.second));
  return Value::list(std::move(out));
}

Value f_string(Interp& in, const Value& v, Args& a) {
  Params p("string", a, {});
  return v.is_string() ? v : Value::string(soft_str(v));
}

Value f_sum(Interp& in, const Value& v, Args& a) {
  Params p("sum", a, {"attribute", "start"});
  AttrGetter get = attrgetter(p.get(0, Value::none()));
  Value acc = p.get(1, Value::integer(0));
  for (const auto& it : in.iter(v)) {
    in.tick();
    Value x = get.parts.empty() ? it : get(in, it);
    if (acc.is_int_like() && x.is_int_like()) {
      int64_t r;
      if (__builtin_add_overflow(acc.i(), x.i(), &r)) fail("integer overflow");
      acc = Value::integer(r);
    } else if (acc.is_number() && x.is_number()) {
      acc = Value::number(acc.f() + x.f());
    } else if (acc.is_list() && x.is_list() && !acc.list().generator && !x.list().generator &&
               acc.list().tuple == x.list().tuple) {
      std::vector<Value> items = acc.list().items;
      items.insert(items.end(), x.list().items.begin(), x.list().items.end());
      in.check_list(items.size());
      acc = Value::list(std::move(items), acc.list().tuple);
    } else {
      if (x.is_undefined()) fail_undefined(x);
      fail(std::string("unsupported operand type(s) for +: '") + type_name(acc) + "' and '" + type_name(x) + "'");
    }
  }
  return acc;
}

Value f_title(Interp& in, const Value& v, Args& a) {
  Params p("title", a, {});
  return Value::string(jinja_title(soft_str(v)));
}

Value f_tojson(Interp& in, const Value& v, Args& a) {
  // transformers: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
  Params p("tojson", a, {"ensure_ascii", "indent", "separators", "sort_keys"});
  JsonOptions o;
  o.ensure_ascii = truthy(p.get(0, Value::boolean(false)));
  Value indent = p.get(1, Value::none());
  if (!indent.is_none()) {
    o.has_indent = true;
    o.item_sep = ",";
    if (indent.is_string()) {
      o.indent = indent.str();
    } else {
      int64_t n = int_arg(indent, "indent");
      if (n > 4096) fail("tojson indent too large");
      o.indent.assign(static_cast<size_t>(std::max<int64_t>(n, 0)), ' ');
    }
  }
  Value seps = p.get(2, Value::none());
  if (!seps.is_none()) {
    if (!seps.is_list() || seps.list().items.size() != 2 || !seps.list().items[0].is_string() ||
        !seps.list().items[1].is_string())
      fail("separators must be a (item_separator, key_separator) pair of strings");
    o.item_sep = seps.list().items[0].str();
    o.key_sep = seps.list().items[1].str();
  }
  o.sort_keys = truthy(p.get(3, Value::boolean(false)));
  std::string r = to_json(v, o);
  in.check_string(r.size());
  return Value::string(std::move(r));
}

Value f_trim(Interp& in, const Value& v, Args& a) {
  Params p("trim", a, {"chars"});
  return same_kind(v, py_strip(soft_str(v), p.get(0, Value::none()), true, true));
}

Value f_unique(Interp& in, const Value& v, Args& a) {
  Params p("unique", a, {"case_sensitive", "attribute"});
  AttrGetter key = attrgetter(p.get(1, Value::none()), !truthy(p.get(0, Value::boolean(false))));
  std::unordered_set<std::string> seen;
  std::vector<Value> out;
  for (const auto& it : in.iter(v)) {
    in.tick();
    Value k = key(in, it);
    auto h = hash_key(k);
    if (!h) fail(std::string("unhashable type: '") + type_name(k) + "'");
    if (seen.insert(*h).second) out.push_back(it);
  }
  return generator(std::move(out));
}

Value f_wordcount(Interp& in, const Value& v, Args& a) {
  Params p("wordcount", a, {});
  // jinja2: len(re.compile(r"\w+").findall(s))
  int64_t n = 0;
  bool in_word = false;
  const std::string s = soft_str(v);
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    bool w = c == '_' || uni::is_alpha(c) || uni::is_digit(c);
    if (w && !in_word) ++n;
    in_word = w;
  }
  return Value::integer(n);
}

Value f_truncate(Interp& in, const Value& v, Args& a) {
  Params p("truncate", a, {"length", "killwords", "end", "leeway"});
  int64_t length = p.has(0) ? int_arg(p[0], "length") : 255;
  bool killwords = truthy(p.get(1, Value::boolean(false)));
  std::string end = p.has(2) ? to_str(p[2]) : "...";
  int64_t leeway = p.has(3) && !p[3].is_none() ? int_arg(p[3], "leeway") : 5;
  int64_t end_len = static_cast<int64_t>(uni::length(end));
  if (length < end_len) fail("expected length >= " + std::to_string(end_len) + ", got " + std::to_string(length));
  if (leeway < 0) fail("expected leeway >= 0, got " + std::to_string(leeway));
  if (!v.is_string()) fail(std::string("object of type '") + type_name(v) + "' has no len()");
  const std::string& s = v.str();
  auto cps = uni::decode(s);
  if (static_cast<int64_t>(cps.size()) <= length + leeway) return v;
  std::string head = uni::encode(cps, 0, static_cast<size_t>(length - end_len));
  if (!killwords) {
    size_t sp = head.rfind(' ');
    if (sp != std::string::npos) head.resize(sp);
  }
  return Value::string(head + end);
}

Value f_batch(Interp& in, const Value& v, Args& a) {
  Params p("batch", a, {"linecount", "fill_with"});
  int64_t n = int_arg(p[0], "linecount");
  if (n <= 0) fail("batch() needs a positive line count");
  std::vector<Value> items = in.iter(v), out, cur;
  for (auto& it : items) {
    in.tick();
    if (static_cast<int64_t>(cur.size()) == n) {
      out.push_back(Value::list(std::move(cur)));
      cur.clear();
    }
    cur.push_back(std::move(it));
  }
  if (!cur.empty()) {
    if (p.has(1) && !p[1].is_none())
      while (static_cast<int64_t>(cur.size()) < n) cur.push_back(p[1]);
    out.push_back(Value::list(std::move(cur)));
  }
  return generator(std::move(out));
}

Value f_slice(Interp& in, const Value& v, Args& a) {
  Params p("slice", a, {"slices", "fill_with"});
  int64_t slices = int_arg(p[0], "slices");
  if (slices <= 0) fail("slice() needs a positive slice count");
  in.check_list(static_cast<size_t>(std::min<int64_t>(slices, INT32_MAX)));
  std::vector<Value> seq = in.iter(v), out;
  int64_t length = static_cast<int64_t>(seq.size()), per = length / slices, extra = length % slices, offset = 0;
  for (int64_t k = 0; k < slices; ++k) {
    int64_t start = offset + k * per;
    if (k < extra) ++offset;
    int64_t end = offset + (k + 1) * per;
    std::vector<Value> part(seq.begin() + start, seq.begin() + end);
    if (p.has(1) && !p[1].is_none() && k >= extra) part.push_back(p[1]);
    out.push_back(Value::list(std::move(part)));
  }
  return generator(std::move(out));
}

// ---------------------------------------------------------------- tests

double num_mod(const Value& v, const Value& m) {
  if (v.is_undefined()) fail_undefined(v);
  if (!v.is_number() || !m.is_number())
    fail(std::string("unsupported operand type(s) for %: '") + type_name(v) + "' and '" + type_name(m) + "'");
  if (v.is_int_like() && m.is_int_like()) {
    if (m.i() == 0) fail("integer division or modulo by zero");
    if (m.i() == -1) return 0;
    int64_t r = v.i() % m.i();
    if (r != 0 && ((r < 0) != (m.i() < 0))) r += m.i();
    return static_cast<double>(r);
  }
  if (m.f() == 0.0) fail("float modulo");
  double r = std::fmod(v.f(), m.f());
  if (r != 0.0 && ((r < 0) != (m.f() < 0))) r += m.f();
  return r;
}

const Value& arg0(Args& a, const char* test) {
  if (a.pos.empty()) {
    for (auto& [k, v] : a.kw) return v;
    fail(std::string(test) + "() missing a required argument");
  }
  return a.pos[0];
}

bool t_odd(Interp&, const Value& v, Args&) { return num_mod(v, Value::integer(2)) == 1; }
bool t_even(Interp&, const Value& v, Args&) { return num_mod(v, Value::integer(2)) == 0; }
bool t_divisibleby(Interp&, const Value& v, Args& a) { return num_mod(v, arg0(a, "divisibleby")) == 0; }
bool t_defined(Interp&, const Value& v, Args&) { return !v.is_undefined(); }
bool t_undefined(Interp&, const Value& v, Args&) { return v.is_undefined(); }
bool t_filter(Interp&, const Value& v, Args&) { return v.is_string() && find_filter(v.str()) != nullptr; }
bool t_test(Interp&, const Value& v, Args&) { return v.is_string() && find_test(v.str()) != nullptr; }
bool t_none(Interp&, const Value& v, Args&) { return v.is_none(); }
bool t_boolean(Interp&, const Value& v, Args&) { return v.kind() == Kind::Bool; }
bool t_false(Interp&, const Value& v, Args&) { return v.kind() == Kind::Bool && !v.b(); }
bool t_true(Interp&, const Value& v, Args&) { return v.kind() == Kind::Bool && v.b(); }
bool t_integer(Interp&, const Value& v, Args&) { return v.kind() == Kind::Int; }
bool t_float(Interp&, const Value& v, Args&) { return v.kind() == Kind::Float; }
bool case_test(const Value& v, bool upper) {
  bool cased = false;
  const std::string s = to_str(v);
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    if (uni::is_upper(c)) {
      if (!upper) return false;
      cased = true;
    } else if (uni::is_lower(c)) {
      if (upper) return false;
      cased = true;
    }
  }
  return cased;
}
bool t_lower(Interp&, const Value& v, Args&) { return case_test(v, false); }
bool t_upper(Interp&, const Value& v, Args&) { return case_test(v, true); }
bool t_string(Interp&, const Value& v, Args&) { return v.is_string(); }
bool t_mapping(Interp&, const Value& v, Args&) { return v.is_dict(); }
bool t_number(Interp&, const Value& v, Args&) { return v.is_number(); }
bool t_sequence(Interp&, const Value& v, Args&) {
  return v.is_string() || v.is_dict() || v.is_undefined() || (v.is_list() && !v.list().generator);
}
bool t_iterable(Interp&, const Value& v, Args&) {
  return v.is_string() || v.is_dict() || v.is_list() || v.is_undefined() || v.kind() == Kind::Loop;
}
bool t_callable(Interp&, const Value& v, Args&) { return v.kind() == Kind::Callable || v.is_undefined(); }
bool t_sameas(Interp&, const Value& v, Args& a) {
  const Value& o = arg0(a, "sameas");
  if (v.kind() != o.kind()) return false;
  switch (v.kind()) {
    case Kind::None:
      return true;
    case Kind::Bool:
      return v.b() == o.b();
    case Kind::Int:
      return v.i() == o.i() && v.i() >= -5 && v.i() <= 256;  // CPython's small-int cache
    case Kind::Float:
      return false;
    default:
      return v.identity() == o.identity();
  }
}
bool t_escaped(Interp&, const Value&, Args&) { return false; }
bool t_in(Interp&, const Value& v, Args& a) { return contains(arg0(a, "in"), v); }
bool t_eq(Interp&, const Value& v, Args& a) { return equals(v, arg0(a, "eq")); }
bool t_ne(Interp&, const Value& v, Args& a) { return !equals(v, arg0(a, "ne")); }
bool t_gt(Interp&, const Value& v, Args& a) { return compare(v, arg0(a, "gt")) > 0; }
bool t_ge(Interp&, const Value& v, Args& a) { return compare(v, arg0(a, "ge")) >= 0; }
bool t_lt(Interp&, const Value& v, Args& a) { return compare(v, arg0(a, "lt")) < 0; }
bool t_le(Interp&, const Value& v, Args& a) { return compare(v, arg0(a, "le")) <= 0; }

struct FilterEntry {
  const char* name;
  FilterFn fn;
};
const FilterEntry kFilters[] = {
    {"abs", f_abs},
    {"attr", f_attr},
    {"batch", f_batch},
    {"slice", f_slice},
    {"truncate", f_truncate},
    {"capitalize", f_capitalize},
    {"center", f_center},
    {"count", f_length},
    {"d", f_default},
    {"default", f_default},
    {"dictsort", f_dictsort},
    {"e", f_escape},
    {"escape", f_escape},
    {"first", f_first},
    {"float", f_float},
    {"forceescape", f_forceescape},
    {"format", f_format},
    {"indent", f_indent},
    {"int", f_int},
    {"items", f_items},
    {"join", f_join},
    {"last", f_last},
    {"length", f_length},
    {"list", f_list},
    {"lower", f_lower},
    {"map", f_map},
    {"max", f_max},
    {"min", f_min},
    {"pprint", f_pprint},
    {"reject", f_reject},
    {"rejectattr", f_rejectattr},
    {"replace", f_replace},
    {"reverse", f_reverse},
    {"round", f_round},
    {"safe", f_safe},
    {"select", f_select},
    {"selectattr", f_selectattr},
    {"sort", f_sort},
    {"string", f_string},
    {"sum", f_sum},
    {"title", f_title},
    {"tojson", f_tojson},
    {"trim", f_trim},
    {"unique", f_unique},
    {"upper", f_upper},
    {"wordcount", f_wordcount},
};

struct TestEntry {
  const char* name;
  TestFn fn;
};
const TestEntry kTests[] = {
    {"odd", t_odd},
    {"even", t_even},
    {"divisibleby", t_divisibleby},
    {"defined", t_defined},
    {"undefined", t_undefined},
    {"filter", t_filter},
    {"test", t_test},
    {"none", t_none},
    {"boolean", t_boolean},
    {"false", t_false},
    {"true", t_true},
    {"integer", t_integer},
    {"float", t_float},
    {"lower", t_lower},
    {"upper", t_upper},
    {"string", t_string},
    {"mapping", t_mapping},
    {"number", t_number},
    {"sequence", t_sequence},
    {"iterable", t_iterable},
    {"callable", t_callable},
    {"sameas", t_sameas},
    {"escaped", t_escaped},
    {"in", t_in},
    {"==", t_eq},
    {"eq", t_eq},
    {"equalto", t_eq},
    {"!=", t_ne},
    {"ne", t_ne},
    {">", t_gt},
    {"gt", t_gt},
    {"greaterthan", t_gt},
    {"ge", t_ge},
    {">=", t_ge},
    {"<", t_lt},
    {"lt", t_lt},
    {"lessthan", t_lt},
    {"<=", t_le},
    {"le", t_le},
};

}  // namespace

FilterFn find_filter(std::string_view name) {
  for (const auto& f : kFilters)
    if (name == f.name) return f.fn;
  return nullptr;
}

TestFn find_test(std::string_view name) {
  for (const auto& t : kTests)
    if (name == t.name) return t.fn;
  return nullptr;
}

}  // namespace larder::jinja
