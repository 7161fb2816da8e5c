// Expands the kernel header named by FA_KERNELS_HEADER (a quoted file name) once per CPU
// target: in namespace `baseline` for the build's baseline x86-64, and, where the compiler
// can (FA_HAVE_AVX2_BUILD), in namespace `avx2` under `#pragma GCC target("avx2,fma,f16c")`.
// The including file picks one at run time with fastaccum::cpu::use_avx2().
//
//   #define FA_KERNELS_HEADER "accumulate_kernels.h"
//   #include "for_each_target.h"
//
// No include guard on purpose: it is included once per kernel header.
#include "multi_tensor.h"

#define FA_KERNEL_NS baseline
#include FA_KERNELS_HEADER
#undef FA_KERNEL_NS

#ifdef FA_HAVE_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FA_KERNEL_NS avx2
#include FA_KERNELS_HEADER
#undef FA_KERNEL_NS
#pragma GCC pop_options
#endif

#undef FA_KERNELS_HEADER
