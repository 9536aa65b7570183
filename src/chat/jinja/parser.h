#pragma once
#include <memory>
#include <string>

#include "chat/jinja/ast.h"

namespace larder::jinja {

// Parses template source into a Program; throws JinjaError with "line N: ..." on syntax
// errors, unknown tags, unknown filters/tests, and nesting past kMaxExprDepth/kMaxBlockDepth.
std::unique_ptr<Program> parse_program(const std::string& source);

}  // namespace larder::jinja
