/* fiber_x86_64.S: the device threads' context switch (sched.cpp). Saves
 * the callee-saved registers, MXCSR and the x87 control word of System V
 * x86-64 on the current stack, stores the stack pointer in *save_sp and
 * resumes the stack at next_sp; ucontext would do the same plus a
 * sigprocmask system call per switch. */
#if defined(__x86_64__)
    .text
    .globl  qs_emu_fiber_swap
    .type   qs_emu_fiber_swap, @function
/* void qs_emu_fiber_swap(void **save_sp, void *next_sp) */
qs_emu_fiber_swap:
    .cfi_startproc
    pushq   %rbp
    pushq   %rbx
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    subq    $8, %rsp
    stmxcsr (%rsp)
    fnstcw  4(%rsp)
    movq    %rsp, (%rdi)
    movq    %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw   4(%rsp)
    addq    $8, %rsp
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %rbx
    popq    %rbp
    ret
    .cfi_endproc
    .size   qs_emu_fiber_swap, .-qs_emu_fiber_swap

    .globl  qs_emu_fiber_start
    .type   qs_emu_fiber_start, @function
/* A fiber's first frame (sched.cpp, fiber_prepare): r12 = the entry, r13
 * its argument. The entry never returns. */
qs_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq    %r13, %rdi
    callq   *%r12
    ud2
    .cfi_endproc
    .size   qs_emu_fiber_start, .-qs_emu_fiber_start
#endif
    .section .note.GNU-stack,"",@progbits
