// `larder kv stats|verify|clear --dir DIR`: look after an SSD KV tier directory.
// stats and verify only read; clear deletes the segment files (nothing else).
#include <sys/stat.h>

#include <cstdint>
#include <cstdio>
#include <map>

#include "cli/commands.h"
#include "kvcache/disk_tier.h"

namespace larder::cli {

int cmd_kv(Args& a) {
  const std::string& action = a.positional;
  if (action != "stats" && action != "verify" && action != "clear")
    return fail("kv: give an action: stats | verify | clear (e.g. larder kv stats --dir DIR)");
  if (a.kv_dir.empty()) return fail("kv: no directory given (use --dir DIR)");
  struct stat sb {};
  if (::stat(a.kv_dir.c_str(), &sb) != 0 || !S_ISDIR(sb.st_mode))
    return fail("kv: '" + a.kv_dir + "' is not a directory");
  if (action == "clear") {
    auto before = kvcache::DiskTier::inspect(a.kv_dir, false);
    if (!before.ok()) return fail(before.error());
    // Opened as a tier (any layout, no capacity limit: nothing is evicted on open), then emptied.
    auto tier = kvcache::DiskTier::open(a.kv_dir, UINT64_MAX / 2, /*layout_fingerprint=*/0);
    if (!tier.ok()) return fail(tier.error());
    if (Status st = (*tier)->clear(); !st.ok()) return fail("kv clear: " + st.error());
    std::printf("cleared %s: %lld segment(s), %lld block(s), %lld bytes\n", a.kv_dir.c_str(),
                static_cast<long long>(before->segments), static_cast<long long>(before->blocks),
                static_cast<long long>(before->bytes));
    return 0;
  }
  std::map<uint64_t, int64_t> layouts;
  auto st = kvcache::DiskTier::inspect(a.kv_dir, action == "verify", &layouts);
  if (!st.ok()) return fail(st.error());
  std::printf("dir %s: %lld segment(s), %lld bytes, %lld block record(s), %lld corrupt or torn\n", a.kv_dir.c_str(),
              static_cast<long long>(st->segments), static_cast<long long>(st->bytes),
              static_cast<long long>(st->blocks), static_cast<long long>(st->corrupt_records));
  for (auto& [fp, n] : layouts)
    std::printf("  layout %016llx: %lld block(s)\n", static_cast<unsigned long long>(fp), static_cast<long long>(n));
  if (action == "verify") {
    if (st->corrupt_records > 0) {
      std::printf("verify: %lld corrupt or torn record(s); they are never served (a restart skips them)\n",
                  static_cast<long long>(st->corrupt_records));
      return 1;
    }
    std::printf("verify: all %lld record(s) pass their checksums\n", static_cast<long long>(st->blocks));
  }
  return 0;
}

}  // namespace larder::cli
