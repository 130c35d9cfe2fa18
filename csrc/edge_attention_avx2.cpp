// AVX2 + FMA build of the edge-attention kernels (compiled with -mavx2 -mfma on
// x86-64 only; the driver in edge_attention.cpp calls it when the CPU has both).
#define DAO_EA_ISA avx2
#include "edge_attention_kernels.inc"
