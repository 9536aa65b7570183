// Documents of RAG requests: the request fields and the texts stored ahead of time.
//
// /v1/completions and /v1/chat/completions accept (vendor extension; plain clients never send it):
//   "documents": [{"text": "..."} | {"id": "doc-..."} | "...", ...]   (in prompt order)
//   "document_mode": "sequential" | "parallel" ("ape") | "reposition" | "blend" | "link" | "focus"
//                    (default focus)
//   "document_options": {"ape_t", "ape_s", "blend_ratio", "blend_layers", "link_k", "focus_budget",
//                        "focus_k"}   (unknown keys are rejected)
//   completions only: "document_prefix": text before the documents (the shared prefix: the
//                     attention sink every document is encoded after; default empty).
// Chat puts the documents at the start of the last user message: the prefix is everything the
// template writes before it (system prompt, header, earlier turns), the query the rest.
//
// /v1/documents stores a text (POST {"text": ...}) under its content id and computes its KV for
// the default prefix (a chat with no system message; or "messages" before the document's user
// turn, or "document_prefix" for completions-style prompts) so the first request finds it ready;
// GET /v1/documents/{id} returns it, DELETE forgets the text (its KV ages out of the cache).
// With an SSD tier (--kv-disk DIR) the texts are kept in DIR/documents/ across restarts, like the
// KV itself.
#pragma once
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/result.h"
#include "docs/docs.h"
#include "server/openai_api.h"

namespace larder::server {

class DocumentStore {
 public:
  // dir: kept across restarts there (empty: memory only). Reads what is there already.
  static Result<std::unique_ptr<DocumentStore>> open(const std::string& dir);
  // "doc-" + 32 hex digits of XXH3-128 of the text.
  static std::string id_of(std::string_view text);
  Result<std::string> put(const std::string& text);
  std::optional<std::string> get(const std::string& id) const;
  bool remove(const std::string& id);
  size_t size() const;

 private:
  std::string dir_;
  mutable std::mutex mu_;
  std::map<std::string, std::string> texts_;
};

struct DocsField {
  bool present = false;
  std::vector<std::string> texts;  // in prompt order, ids resolved
  docs::Params params;
  std::string prefix;              // completions: "document_prefix"
};

// Reads the document fields of a request body (absent: present = false). Unknown ids give a 404
// error naming the id; store may be null (then ids are unknown).
std::optional<ApiError> parse_documents(const ojson& body, const DocumentStore* store, DocsField& out);

}  // namespace larder::server
