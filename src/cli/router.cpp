// `larder router` (being written).
#include "cli/commands.h"

namespace larder::cli {
int cmd_router(Args& a) { return fail("larder router is not built yet"); }
}  // namespace larder::cli
