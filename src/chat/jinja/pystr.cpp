#include "chat/jinja/pystr.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "chat/jinja/builtins.h"
#include "chat/jinja/unicode.h"

namespace larder::jinja {
namespace {

bool is_cased(uint32_t c) { return uni::is_upper(c) || uni::is_lower(c); }

bool in_set(const std::vector<uint32_t>& set, uint32_t c) {
  for (uint32_t x : set)
    if (x == c) return true;
  return false;
}

bool is_line_break(uint32_t c) {
  return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 || c == 0x2028 ||
         c == 0x2029;
}

int64_t to_index(const Value& v, const char* what) {
  if (v.is_int_like()) return v.i();
  if (v.kind() == Kind::Float) fail(std::string(what) + " argument must be an integer, not float");
  fail(std::string("an integer is required for ") + what + ", not " + type_name(v));
}

void add_part(std::vector<std::string>& out, size_t max_parts, std::string part) {
  if (out.size() >= max_parts) fail("list exceeds " + std::to_string(max_parts) + " items");
  out.push_back(std::move(part));
}

}  // namespace

std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  std::vector<uint32_t> cps = uni::decode(s);
  bool ws = chars.is_none() || chars.is_undefined();
  if (!ws && !chars.is_string()) fail(std::string("strip arg must be None or str, not ") + type_name(chars));
  std::vector<uint32_t> set = ws ? std::vector<uint32_t>{} : uni::decode(chars.str());
  auto strip_it = [&](uint32_t c) { return ws ? uni::is_space(c) : in_set(set, c); };
  size_t b = 0, e = cps.size();
  if (left)
    while (b < e && strip_it(cps[b])) ++b;
  if (right)
    while (e > b && strip_it(cps[e - 1])) --e;
  return uni::encode(cps, b, e);
}

std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right,
                                  size_t max_parts) {
  std::vector<std::string> out;
  if (sep.is_none() || sep.is_undefined()) {
    std::vector<uint32_t> cps = uni::decode(s);
    size_t n = cps.size();
    if (!from_right) {
      size_t i = 0;
      while (i < n) {
        while (i < n && uni::is_space(cps[i])) ++i;
        if (i >= n) break;
        if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
          add_part(out, max_parts, uni::encode(cps, i, n));  // the remainder keeps its trailing whitespace
          break;
        }
        size_t j = i;
        while (j < n && !uni::is_space(cps[j])) ++j;
        add_part(out, max_parts, uni::encode(cps, i, j));
        i = j;
      }
    } else {
      size_t i = n;
      while (i > 0) {
        while (i > 0 && uni::is_space(cps[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) {
          add_part(out, max_parts, uni::encode(cps, 0, i));
          break;
        }
        size_t j = i;
        while (j > 0 && !uni::is_space(cps[j - 1])) --j;
        add_part(out, max_parts, uni::encode(cps, j, i));
        i = j;
      }
      std::reverse(out.begin(), out.end());
    }
    return out;
  }
  if (!sep.is_string()) fail(std::string("must be str or None, not ") + type_name(sep));
  const std::string& d = sep.str();
  if (d.empty()) fail("empty separator");
  if (!from_right) {
    size_t pos = 0;
    for (;;) {
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) break;
      size_t f = s.find(d, pos);
      if (f == std::string::npos) break;
      add_part(out, max_parts, s.substr(pos, f - pos));
      pos = f + d.size();
    }
    add_part(out, max_parts, s.substr(pos));
  } else {
    size_t end = s.size();
    for (;;) {
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) == maxsplit) break;
      if (end < d.size()) break;
      size_t f = s.rfind(d, end - d.size());
      if (f == std::string::npos) break;
      add_part(out, max_parts, s.substr(f + d.size(), end - f - d.size()));
      end = f;
    }
    add_part(out, max_parts, s.substr(0, end));
    std::reverse(out.begin(), out.end());
  }
  return out;
}

std::vector<std::string> py_splitlines(const std::string& s, bool keepends, size_t max_parts) {
  std::vector<std::string> out;
  std::vector<uint32_t> cps = uni::decode(s);
  size_t i = 0, start = 0, n = cps.size();
  while (i < n) {
    if (!is_line_break(cps[i])) {
      ++i;
      continue;
    }
    size_t eol = i;
    if (cps[i] == '\r' && i + 1 < n && cps[i + 1] == '\n') ++i;
    ++i;
    add_part(out, max_parts, uni::encode(cps, start, keepends ? i : eol));
    start = i;
  }
  if (start < n) add_part(out, max_parts, uni::encode(cps, start, n));
  return out;
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count,
                       size_t max_bytes) {
  std::string out;
  if (old.empty()) {
    std::vector<uint32_t> cps = uni::decode(s);
    int64_t slots = static_cast<int64_t>(cps.size()) + 1;
    int64_t n = count < 0 ? slots : std::min(count, slots);
    if (static_cast<double>(n) * rep.size() + s.size() > static_cast<double>(max_bytes))
      fail("string result too large");
    for (size_t k = 0; k < cps.size(); ++k) {
      if (static_cast<int64_t>(k) < n) out += rep;
      uni::append(out, cps[k]);
    }
    if (n == slots) out += rep;
    return out;
  }
  int64_t hits = 0;
  for (size_t p = s.find(old); p != std::string::npos && (count < 0 || hits < count); p = s.find(old, p + old.size()))
    ++hits;
  if (static_cast<double>(s.size()) + static_cast<double>(hits) * (static_cast<double>(rep.size()) - old.size()) >
      max_bytes)
    fail("string result too large");
  size_t pos = 0;
  for (int64_t k = 0; k < hits; ++k) {
    size_t f = s.find(old, pos);
    out.append(s, pos, f - pos);
    out += rep;
    pos = f + old.size();
  }
  out.append(s, pos, std::string::npos);
  return out;
}

std::string py_title(const std::string& s) {
  std::string out;
  bool prev_cased = false;
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    uni::append(out, prev_cased ? uni::to_lower(c) : uni::to_upper(c));
    prev_cased = is_cased(c);
  }
  return out;
}

std::string py_capitalize(const std::string& s) {
  std::string out;
  bool first = true;
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    uni::append(out, first ? uni::to_upper(c) : uni::to_lower(c));
    first = false;
  }
  return out;
}

std::string py_swapcase(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    uni::append(out, uni::is_upper(c) ? uni::to_lower(c) : uni::to_upper(c));
  }
  return out;
}

std::string jinja_title(const std::string& s) {
  std::string out;
  bool word_start = true;
  for (size_t i = 0; i < s.size();) {
    uint32_t c = uni::next(s, i);
    bool sep = c == '-' || c == '(' || c == '{' || c == '[' || c == '<' || uni::is_space(c);
    if (sep) {
      uni::append(out, c);
      word_start = true;
    } else {
      uni::append(out, word_start ? uni::to_upper(c) : uni::to_lower(c));
      word_start = false;
    }
  }
  return out;
}

std::string py_pad(const std::string& s, int64_t width, uint32_t fill, char align) {
  int64_t len = static_cast<int64_t>(uni::length(s));
  if (width <= len) return s;
  if (width > (1 << 24)) fail("padding width too large");
  int64_t pad = width - len, left = 0;
  if (align == '>') left = pad;
  if (align == '^') left = pad / 2 + (pad & width & 1);  // CPython's str.center split
  std::string out;
  for (int64_t k = 0; k < left; ++k) uni::append(out, fill);
  out += s;
  for (int64_t k = 0; k < pad - left; ++k) uni::append(out, fill);
  return out;
}

int64_t py_find(const std::string& s, const std::string& sub, bool from_right) {
  size_t p = from_right ? s.rfind(sub) : s.find(sub);
  if (p == std::string::npos) return -1;
  return static_cast<int64_t>(uni::length(std::string_view(s).substr(0, p)));
}

int64_t py_count(const std::string& s, const std::string& sub) {
  if (sub.empty()) return static_cast<int64_t>(uni::length(s)) + 1;
  int64_t n = 0;
  for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
  return n;
}

// ---------------------------------------------------------------- formatting

namespace {

std::string fmt_number(const char* spec_flags, int width, int prec, char type, const Value& v) {
  std::string spec = "%";
  spec += spec_flags;
  if (width > 0) spec += std::to_string(std::min(width, 4096));
  if (prec >= 0) {
    spec += '.';
    spec += std::to_string(std::min(prec, 512));
  }
  char buf[8192];
  if (type == 'd' || type == 'i' || type == 'u' || type == 'x' || type == 'X' || type == 'o') {
    int64_t x;
    if (v.is_int_like()) {
      x = v.i();
    } else if (v.kind() == Kind::Float) {
      if (!std::isfinite(v.f())) fail("cannot convert float infinity or NaN to integer");
      if (std::fabs(v.f()) >= 9.2e18) fail("integer overflow");
      x = static_cast<int64_t>(v.f());
    } else {
      fail(std::string("%") + type + " format: a real number is required, not " + type_name(v));
    }
    if (type == 'i' || type == 'u') type = 'd';
    spec += "ll";
    spec += type;
    if (type == 'd') {
      std::snprintf(buf, sizeof buf, spec.c_str(), static_cast<long long>(x));
    } else {
      // Python prints negative hex/octal with a sign, not two's complement.
      std::string body = spec;
      std::snprintf(buf, sizeof buf, body.c_str(),
                    static_cast<unsigned long long>(x < 0 ? -static_cast<unsigned long long>(x) : x));
      if (x < 0) {
        std::string neg = "-";
        neg += buf;
        return neg;
      }
    }
    return buf;
  }
  if (!v.is_number()) fail(std::string("must be real number, not ") + type_name(v));
  spec += type;
  std::snprintf(buf, sizeof buf, spec.c_str(), v.f());
  return buf;
}

}  // namespace

std::string percent_format(const std::string& fmt, const Value& args) {
  std::vector<Value> vals;
  const DictObj* mapping = nullptr;
  // CPython treats any non-tuple argument with __getitem__ (dict, list, jinja2's Undefined) as
  // a mapping: "%s" uses it whole, and unconsumed arguments are no error.
  bool mapping_like =
      args.is_dict() || args.is_undefined() || (args.is_list() && !args.list().tuple && !args.list().generator);
  if (args.is_list() && args.list().tuple) {
    vals = args.list().items;
  } else {
    if (args.is_dict()) mapping = &args.dict();
    vals.push_back(args);
  }
  size_t next_arg = 0;
  bool used_mapping = false;
  auto take = [&]() -> const Value& {
    if (next_arg >= vals.size()) fail("not enough arguments for format string");
    return vals[next_arg++];
  };
  std::string out;
  for (size_t i = 0; i < fmt.size(); ++i) {
    if (fmt[i] != '%') {
      out += fmt[i];
      continue;
    }
    if (++i >= fmt.size()) fail("incomplete format");
    if (fmt[i] == '%') {
      out += '%';
      continue;
    }
    Value keyed;
    bool has_key = false;
    if (fmt[i] == '(') {
      size_t close = fmt.find(')', i);
      if (close == std::string::npos) fail("incomplete format key");
      if (args.is_undefined()) fail_undefined(args);
      if (!mapping) fail("format requires a mapping");
      const Value* v = mapping->find(fmt.substr(i + 1, close - i - 1));
      if (!v) fail("KeyError: '" + fmt.substr(i + 1, close - i - 1) + "'");
      keyed = *v;
      has_key = used_mapping = true;
      i = close + 1;
    }
    std::string flags;
    while (i < fmt.size() && std::string("-+ #0").find(fmt[i]) != std::string::npos) flags += fmt[i++];
    int width = 0, prec = -1;
    if (i < fmt.size() && fmt[i] == '*') {
      width = static_cast<int>(to_index(take(), "* width"));
      ++i;
    }
    while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') width = std::min(width * 10 + (fmt[i++] - '0'), 100000);
    if (i < fmt.size() && fmt[i] == '.') {
      ++i;
      prec = 0;
      if (i < fmt.size() && fmt[i] == '*') {
        prec = static_cast<int>(to_index(take(), "* precision"));
        ++i;
      }
      while (i < fmt.size() && fmt[i] >= '0' && fmt[i] <= '9') prec = std::min(prec * 10 + (fmt[i++] - '0'), 100000);
    }
    while (i < fmt.size() && (fmt[i] == 'h' || fmt[i] == 'l' || fmt[i] == 'L')) ++i;
    if (i >= fmt.size()) fail("incomplete format");
    char type = fmt[i];
    const Value& v = has_key ? keyed : take();
    if (type == 's' || type == 'r' || type == 'a') {
      std::string s;
      if (type == 's') {
        s = to_str(v);
      } else {
        repr_into(s, v);
      }
      if (prec >= 0) s = uni::encode(uni::decode(s), 0, static_cast<size_t>(prec));
      out += py_pad(s, width, ' ', flags.find('-') != std::string::npos ? '<' : '>');
    } else if (type == 'c') {
      if (v.is_string()) {
        out += v.str();
      } else {
        uni::append(out, static_cast<uint32_t>(to_index(v, "%c")));
      }
    } else if (std::string("diuxXoeEfFgG").find(type) != std::string::npos) {
      out += fmt_number(flags.c_str(), width, prec, type, v);
    } else {
      fail(std::string("unsupported format character '") + type + "'");
    }
  }
  if (!mapping_like && next_arg < vals.size()) fail("not all arguments converted during string formatting");
  (void)used_mapping;
  return out;
}

namespace {

std::string apply_spec(const Value& v, const std::string& spec) {
  if (spec.empty()) return to_str(v);
  size_t i = 0;
  uint32_t fill = ' ';
  char align = 0;
  std::vector<uint32_t> cps = uni::decode(spec);
  auto is_align = [](uint32_t c) { return c == '<' || c == '>' || c == '^' || c == '='; };
  if (cps.size() >= 2 && is_align(cps[1])) {
    fill = cps[0];
    align = static_cast<char>(cps[1]);
    i = 2;
  } else if (!cps.empty() && is_align(cps[0])) {
    align = static_cast<char>(cps[0]);
    i = 1;
  }
  std::string flags;
  if (i < cps.size() && (cps[i] == '+' || cps[i] == '-' || cps[i] == ' ')) {
    if (cps[i] != '-') flags += static_cast<char>(cps[i]);
    ++i;
  }
  if (i < cps.size() && cps[i] == '#') {
    flags += '#';
    ++i;
  }
  if (i < cps.size() && cps[i] == '0') {
    if (!align) {
      fill = '0';
      align = '=';
    }
    ++i;
  }
  int width = 0, prec = -1;
  while (i < cps.size() && cps[i] >= '0' && cps[i] <= '9')
    width = std::min(width * 10 + static_cast<int>(cps[i++] - '0'), 100000);
  if (i < cps.size() && cps[i] == '.') {
    ++i;
    prec = 0;
    while (i < cps.size() && cps[i] >= '0' && cps[i] <= '9')
      prec = std::min(prec * 10 + static_cast<int>(cps[i++] - '0'), 100000);
  }
  char type = 0;
  if (i < cps.size()) type = static_cast<char>(cps[i++]);
  if (i != cps.size()) fail("Invalid format specifier");
  std::string body;
  if (v.is_string() || v.is_none() || v.is_list() || v.is_dict() || v.is_undefined()) {
    if (type && type != 's')
      fail(std::string("Unknown format code '") + type + "' for object of type '" + type_name(v) + "'");
    body = to_str(v);
    if (prec >= 0) body = uni::encode(uni::decode(body), 0, static_cast<size_t>(prec));
    if (!align) align = '<';
  } else if (v.is_number()) {
    if (!align) align = '>';
    if (!type && v.kind() != Kind::Float) type = 'd';
    if (!type) {
      body = prec >= 0 ? fmt_number(flags.c_str(), 0, prec, 'g', v) : to_str(v);
      if (flags.find('+') != std::string::npos && v.f() >= 0) body = "+" + body;
    } else if (type == '%') {
      body = fmt_number(flags.c_str(), 0, prec < 0 ? 6 : prec, 'f', Value::number(v.f() * 100)) + "%";
    } else if (std::string("dxXoeEfFgG").find(type) != std::string::npos) {
      if (type == 'd' && !v.is_int_like()) fail("Unknown format code 'd' for object of type 'float'");
      body = fmt_number(flags.c_str(), 0,
                        (type == 'f' || type == 'F' || type == 'e' || type == 'E') && prec < 0 ? 6 : prec, type, v);
    } else {
      fail(std::string("Unknown format code '") + type + "'");
    }
  } else {
    body = to_str(v);
    if (!align) align = '<';
  }
  if (align == '=') {
    size_t len = uni::length(body);
    if (static_cast<int64_t>(len) >= width) return body;
    std::string sign;
    if (!body.empty() && (body[0] == '-' || body[0] == '+' || body[0] == ' ')) {
      sign = body.substr(0, 1);
      body.erase(0, 1);
    }
    std::string pad;
    for (size_t k = len; k < static_cast<size_t>(width); ++k) uni::append(pad, fill);
    return sign + pad + body;
  }
  return py_pad(body, width, fill, align);
}

}  // namespace

std::string str_format(const std::string& fmt, const CallArgs& args) {
  std::string out;
  size_t auto_idx = 0;
  for (size_t i = 0; i < fmt.size(); ++i) {
    char c = fmt[i];
    if (c == '}') {
      if (i + 1 < fmt.size() && fmt[i + 1] == '}') {
        out += '}';
        ++i;
        continue;
      }
      fail("Single '}' encountered in format string");
    }
    if (c != '{') {
      out += c;
      continue;
    }
    if (i + 1 < fmt.size() && fmt[i + 1] == '{') {
      out += '{';
      ++i;
      continue;
    }
    size_t close = fmt.find('}', i);
    if (close == std::string::npos) fail("Single '{' encountered in format string");
    std::string field = fmt.substr(i + 1, close - i - 1);
    i = close;
    std::string spec, conv;
    size_t colon = field.find(':');
    if (colon != std::string::npos) {
      spec = field.substr(colon + 1);
      field.resize(colon);
    }
    size_t bang = field.find('!');
    if (bang != std::string::npos) {
      conv = field.substr(bang + 1);
      field.resize(bang);
    }
    const Value* v = nullptr;
    if (field.empty()) {
      if (auto_idx >= args.pos.size())
        fail("Replacement index " + std::to_string(auto_idx) + " out of range for positional args tuple");
      v = &args.pos[auto_idx++];
    } else if (field.find_first_not_of("0123456789") == std::string::npos) {
      size_t idx = std::strtoul(field.c_str(), nullptr, 10);
      if (field.size() > 6 || idx >= args.pos.size())
        fail("Replacement index " + field + " out of range for positional args tuple");
      v = &args.pos[idx];
    } else {
      for (const auto& [k, val] : args.kw)
        if (k == field) v = &val;
      if (!v) fail("KeyError: '" + field + "'");
    }
    Value shown = *v;
    if (conv == "r" || conv == "a") {
      std::string r;
      repr_into(r, *v);
      shown = Value::string(std::move(r));
    } else if (conv == "s") {
      shown = Value::string(to_str(*v));
    } else if (!conv.empty()) {
      fail("Unknown conversion specifier " + conv);
    }
    out += apply_spec(shown, spec);
  }
  return out;
}

// ---------------------------------------------------------------- int() / float()

std::optional<int64_t> py_parse_int(const std::string& in, int base) {
  std::string s = py_strip(in, Value::none(), true, true);
  size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
  auto prefix = [&](char p) { return i + 1 < s.size() && s[i] == '0' && (s[i + 1] | 32) == p; };
  bool had_prefix = false;
  if (base == 0) {
    if (prefix('x')) {
      base = 16;
    } else if (prefix('o')) {
      base = 8;
    } else if (prefix('b')) {
      base = 2;
    } else {
      base = 10;
      // Base 0 rejects leading zeros on non-zero decimals ("010").
      size_t k = i;
      while (k < s.size() && (s[k] == '0' || s[k] == '_')) ++k;
      if (k > i && k < s.size() && s[k] >= '1' && s[k] <= '9') return std::nullopt;
    }
    if (base != 10) {
      i += 2;
      had_prefix = true;
    }
  } else if ((base == 16 && prefix('x')) || (base == 8 && prefix('o')) || (base == 2 && prefix('b'))) {
    i += 2;
    had_prefix = true;
  }
  if (base < 2 || base > 36) return std::nullopt;
  if (had_prefix && i < s.size() && s[i] == '_') ++i;
  uint64_t v = 0;
  bool any = false, prev_us = false;
  for (; i < s.size(); ++i) {
    char c = s[i];
    if (c == '_') {
      if (!any || prev_us) return std::nullopt;
      prev_us = true;
      continue;
    }
    int d = (c >= '0' && c <= '9') ? c - '0' : ((c | 32) >= 'a' && (c | 32) <= 'z') ? (c | 32) - 'a' + 10 : 99;
    if (d >= base) return std::nullopt;
    if (v > (static_cast<uint64_t>(INT64_MAX) + 1 - d) / base) return std::nullopt;  // beyond int64
    v = v * base + d;
    any = true;
    prev_us = false;
  }
  if (!any || prev_us) return std::nullopt;
  if (!neg && v > static_cast<uint64_t>(INT64_MAX)) return std::nullopt;
  return neg ? static_cast<int64_t>(0 - v) : static_cast<int64_t>(v);
}

std::optional<double> py_parse_float(const std::string& in) {
  std::string s = py_strip(in, Value::none(), true, true);
  size_t i = 0;
  std::string clean;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
  std::string rest = uni::lower(s.substr(i));
  if (rest == "inf" || rest == "infinity" || rest == "nan") {
    clean += rest == "nan" ? "nan" : "inf";
    return std::strtod(clean.c_str(), nullptr);
  }
  auto digits = [&]() {
    size_t n = 0;
    while (i < s.size()) {
      if (s[i] >= '0' && s[i] <= '9') {
        clean += s[i++];
        ++n;
      } else if (s[i] == '_' && n && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '9') {
        ++i;
      } else {
        break;
      }
    }
    return n;
  };
  size_t mant = digits();
  if (i < s.size() && s[i] == '.') {
    clean += s[i++];
    mant += digits();
  }
  if (!mant) return std::nullopt;
  if (i < s.size() && (s[i] | 32) == 'e') {
    clean += s[i++];
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) clean += s[i++];
    if (!digits()) return std::nullopt;
  }
  if (i != s.size()) return std::nullopt;
  return std::strtod(clean.c_str(), nullptr);
}

}  // namespace larder::jinja
