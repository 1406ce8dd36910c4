# Corral's KVM probe kernel. Sources/Libvirt/KVMProbe.swift embeds the bytes
# that `scripts/kvm-probe-bytes` prints (GNU as + ld); a test checks they agree.
# A multiboot (a.out kludge) kernel loaded at 1 MiB, entered in 32-bit
# protected mode: it switches to 64-bit long mode with paging, as every x86-64
# kernel does early, then writes the marker to COM1.
        .set LOAD, 0x100000
        .set PML4, 0x110000
        .set PDPT, 0x111000
        .set PD,   0x112000
        .code32
        .text
        .globl _start
_start:
header:
        .long 0x1BADB002
        .long 0x00010000
        .long -(0x1BADB002 + 0x00010000)
        .long LOAD, LOAD, 0, 0, entry
entry:
        cld
        movl $PML4, %edi
        movl $(3 * 1024), %ecx
        xorl %eax, %eax
        rep stosl
        movl $(PDPT | 3), PML4
        movl $(PD | 3), PDPT
        movl $0x83, PD
        movl %cr4, %eax
        orl $0x20, %eax
        movl %eax, %cr4
        movl $PML4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx
        rdmsr
        orl $0x100, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax
        movl %eax, %cr0
        lgdt gdtr
        ljmp $0x08, $long_mode
        .code64
long_mode:
        movw $0x3f8, %dx
        leaq message(%rip), %rsi
print:
        lodsb
        testb %al, %al
        jz halt
        outb %al, %dx
        jmp print
halt:
        hlt
        jmp halt
        .balign 8
gdt:
        .quad 0
        .quad 0x00209A0000000000
gdtr:
        .word 15
        .long gdt
message:
        .asciz "corral-kvm-probe-ok\n"
