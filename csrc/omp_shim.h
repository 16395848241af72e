/* OpenMP when the build has it, serial stand-ins when it does not (see setup.py). */
#ifndef LLM_FAST_OMP_SHIM_H
#define LLM_FAST_OMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
static inline int lf_have_openmp(void) { return 1; }
#else
static inline int omp_get_max_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int lf_have_openmp(void) { return 0; }
#endif
#endif
