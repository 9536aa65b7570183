// Python str semantics that templates observe: strip/split/replace/title/capitalize,
// `%` formatting, str.format, and int()/float() parsing of strings.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "chat/jinja/value.h"

namespace larder::jinja {

struct CallArgs;

// chars: None/Undefined strips whitespace, a string strips those characters.
std::string py_strip(const std::string& s, const Value& chars, bool left, bool right);
// sep None/Undefined splits on whitespace runs; maxsplit < 0 means no limit. Both throw
// once the result would hold more than max_parts strings.
std::vector<std::string> py_split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right,
                                  size_t max_parts = SIZE_MAX);
std::vector<std::string> py_splitlines(const std::string& s, bool keepends, size_t max_parts = SIZE_MAX);
// Throws when the result would exceed max_bytes.
std::string py_replace(const std::string& s, const std::string& old, const std::string& rep, int64_t count,
                       size_t max_bytes);
std::string py_title(const std::string& s);       // str.title()
std::string py_capitalize(const std::string& s);  // str.capitalize()
std::string py_swapcase(const std::string& s);
std::string jinja_title(const std::string& s);  // the |title filter (word starts after - space ( { [ <)
std::string py_pad(const std::string& s, int64_t width, uint32_t fill, char align);  // '<' '>' '^' (str.center rule)
int64_t py_find(const std::string& s, const std::string& sub, bool from_right);      // code point index or -1
int64_t py_count(const std::string& s, const std::string& sub);

std::string percent_format(const std::string& fmt, const Value& args);  // str % args
std::string str_format(const std::string& fmt, const CallArgs& args);   // str.format(*args, **kwargs)

std::optional<int64_t> py_parse_int(const std::string& s, int base);
std::optional<double> py_parse_float(const std::string& s);

}  // namespace larder::jinja
