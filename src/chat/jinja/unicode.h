// UTF-8 and the small slice of Python's Unicode behaviour that templates see: code-point
// indexing, str.isspace(), case mapping (Latin, Greek, Cyrillic, full-width; not the full
// Unicode tables) and str.isprintable() for repr().
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace larder::jinja::uni {

// Decodes the code point at s[i] and advances i. Invalid bytes decode as U+DC80+byte
// (Python's surrogateescape), so any byte string round-trips through encode().
uint32_t next(std::string_view s, size_t& i);
void append(std::string& out, uint32_t cp);
std::vector<uint32_t> decode(std::string_view s);
std::string encode(const std::vector<uint32_t>& cps, size_t begin = 0, size_t end = SIZE_MAX);
size_t length(std::string_view s);
bool is_ascii(std::string_view s);

bool is_space(uint32_t c);  // str.isspace()
bool is_upper(uint32_t c);
bool is_lower(uint32_t c);
bool is_alpha(uint32_t c);
bool is_digit(uint32_t c);
bool is_printable(uint32_t c);  // str.isprintable() (approximate outside common scripts)
uint32_t to_upper(uint32_t c);
uint32_t to_lower(uint32_t c);

std::string upper(std::string_view s);
std::string lower(std::string_view s);

}  // namespace larder::jinja::uni
