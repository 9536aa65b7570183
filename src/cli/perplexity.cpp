#include "cli/commands.h"

namespace larder::cli {
// Being implemented (issue 3); refuses cleanly until then.
int cmd_perplexity(Args&) { return fail("perplexity is not implemented yet"); }
}  // namespace larder::cli
