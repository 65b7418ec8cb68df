#include "qs_collectives.h"
