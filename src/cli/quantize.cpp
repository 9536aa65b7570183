#include "cli/commands.h"

namespace larder::cli {
// Being implemented (issue 3); refuses cleanly until then.
int cmd_quantize(Args&) { return fail("quantize is not implemented yet"); }
}  // namespace larder::cli
