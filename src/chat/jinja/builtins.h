// Filters, tests, methods of str/dict/list/loop, attribute/item lookup and global functions,
// each following jinja2's ImmutableSandboxedEnvironment as transformers configures it.
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "chat/jinja/ast.h"
#include "chat/jinja/value.h"

namespace larder::jinja {

struct Scope;
struct CallableObj;

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
};

FilterFn find_filter(std::string_view name);
TestFn find_test(std::string_view name);

// environment.getattr / getitem: dict keys, methods, undefined on a miss, error on undefined.
Value get_attr(Interp& in, const Value& obj, const std::string& name);
Value get_item(Interp& in, const Value& obj, const Value& key);
Value get_slice(Interp& in, const Value& obj, const Value& start, const Value& stop, const Value& step);
Value call_method(Interp& in, const CallableObj& method, CallArgs& args);

// range, dict, namespace, raise_exception, strftime_now.
void install_globals(Scope& globals);

}  // namespace larder::jinja
