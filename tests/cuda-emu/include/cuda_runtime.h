/* cuda_runtime.h (cuda-emu): what nvcc gives every .cu file. */
#ifndef QS_EMU_CUDA_RUNTIME_H
#define QS_EMU_CUDA_RUNTIME_H
#include "cuda_runtime_api.h"
#ifdef __cplusplus
#include "qs_emu.h"
#endif
#endif
