#include "qs_shard.h"
