//! The allow-list as a compact BPF program, built here because seccompiler emits one
//! comparison chain per syscall (1567 instructions for this list): the kernel emulates a new
//! filter for every syscall number when it is installed (to cache the always-allowed ones), and
//! with the chain that took ~1 ms at every sandbox start. Runs of consecutive allowed numbers
//! become one range test each (~150 instructions in all, every jump short), in ascending order.

use std::collections::BTreeMap;

use seccompiler::sock_filter;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets in `struct seccomp_data`: `nr`, `arch`, the low 32 bits of `args[0]`
/// (little-endian, as on every architecture we build for).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LO: u32 = 16;

/// What an allowed syscall may be called with (its first argument's low 32 bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgRule {
    /// Any arguments.
    Any,
    /// None of these bits may be set.
    NoBits(u32),
    /// One of these values.
    OneOf(Vec<u32>),
    /// None of these values.
    NoneOf(Vec<u32>),
}

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// A program that allows the syscalls of `allowed` (each with its argument rule), answers
/// `deny` (a `SECCOMP_RET_*` value) to every other number and to calls whose argument does not
/// fit, and kills a call from another architecture than `audit_arch`.
pub fn allow_list(
    audit_arch: u32,
    allowed: &BTreeMap<u32, ArgRule>,
    deny: u32,
) -> Vec<sock_filter> {
    let allow = libc::SECCOMP_RET_ALLOW;
    let mut p = vec![
        ins(LD_W_ABS, 0, 0, ARCH),
        ins(JEQ_K, 1, 0, audit_arch),
        ins(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        ins(LD_W_ABS, 0, 0, NR),
    ];
    // Consecutive unconditional numbers form one range; a conditional number is a range of its
    // own, followed by its argument check (which ends in a return, so `A` may be reloaded).
    let mut ranges: Vec<(u32, u32, &ArgRule)> = Vec::new();
    for (&nr, rule) in allowed {
        match ranges.last_mut() {
            Some((_, hi, ArgRule::Any)) if *rule == ArgRule::Any && *hi + 1 == nr => *hi = nr,
            _ => ranges.push((nr, nr, rule)),
        }
    }
    for (lo, hi, rule) in ranges {
        // nr < lo: in the gap before this range.
        p.push(ins(JGE_K, 1, 0, lo));
        p.push(ins(RET_K, 0, 0, deny));
        // nr > hi: on to the next range.
        let check = arg_check(rule, allow, deny);
        let skip = u8::try_from(check.len()).unwrap_or(u8::MAX);
        p.push(ins(JGT_K, skip, 0, hi));
        p.extend(check);
    }
    p.push(ins(RET_K, 0, 0, deny));
    p
}

/// The instructions deciding a call in range (`A` holds the number), each path ending in a
/// return. Short: every jump fits its 8-bit offset.
fn arg_check(rule: &ArgRule, allow: u32, deny: u32) -> Vec<sock_filter> {
    match rule {
        ArgRule::Any => vec![ins(RET_K, 0, 0, allow)],
        ArgRule::NoBits(mask) => vec![
            ins(LD_W_ABS, 0, 0, ARG0_LO),
            ins(JSET_K, 0, 1, *mask),
            ins(RET_K, 0, 0, deny),
            ins(RET_K, 0, 0, allow),
        ],
        ArgRule::OneOf(values) | ArgRule::NoneOf(values) => {
            let (hit, miss) = if matches!(rule, ArgRule::OneOf(_)) {
                (allow, deny)
            } else {
                (deny, allow)
            };
            let n = values.len();
            let mut v = vec![ins(LD_W_ABS, 0, 0, ARG0_LO)];
            for (i, value) in values.iter().enumerate() {
                // On a match, jump to the `hit` return after the remaining comparisons and the
                // `miss` return.
                let to_hit = u8::try_from(n - i).unwrap_or(u8::MAX);
                v.push(ins(JEQ_K, to_hit, 0, *value));
            }
            v.push(ins(RET_K, 0, 0, miss));
            v.push(ins(RET_K, 0, 0, hit));
            v
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions these programs use: what the kernel
    /// would answer for `(arch, nr, arg0)`.
    pub(crate) fn run(p: &[sock_filter], arch: u32, nr: u32, arg0: u64) -> u32 {
        let load = |k: u32| match k {
            NR => nr,
            ARCH => arch,
            ARG0_LO => arg0 as u32,
            20 => (arg0 >> 32) as u32,
            other => panic!("load of offset {other}"),
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = &p[pc];
            let jump = |cond: bool| pc + 1 + usize::from(if cond { i.jt } else { i.jf });
            pc = match i.code {
                LD_W_ABS => {
                    a = load(i.k);
                    pc + 1
                }
                JEQ_K => jump(a == i.k),
                JGE_K => jump(a >= i.k),
                JGT_K => jump(a > i.k),
                JSET_K => jump(a & i.k != 0),
                RET_K => return i.k,
                other => panic!("opcode {other:#x}"),
            };
        }
    }

    #[test]
    fn ranges_and_argument_rules_decide_every_number() {
        let deny = libc::SECCOMP_RET_ERRNO | 38;
        let allow = libc::SECCOMP_RET_ALLOW;
        let mut allowed = BTreeMap::new();
        for nr in [0, 1, 2, 5, 6, 9, 300] {
            allowed.insert(nr, ArgRule::Any);
        }
        allowed.insert(3, ArgRule::NoBits(0x10));
        allowed.insert(7, ArgRule::OneOf(vec![0, 8]));
        allowed.insert(8, ArgRule::NoneOf(vec![38, 40]));
        let p = allow_list(0xc000_003e, &allowed, deny);
        for nr in 0..400 {
            let want = match allowed.get(&nr) {
                Some(ArgRule::Any) => allow,
                Some(_) => continue,
                None => deny,
            };
            assert_eq!(run(&p, 0xc000_003e, nr, 0), want, "nr {nr}");
        }
        assert_eq!(run(&p, 0xc000_003e, 3, 0x1), allow);
        assert_eq!(run(&p, 0xc000_003e, 3, 0x11), deny);
        assert_eq!(run(&p, 0xc000_003e, 7, 8), allow);
        assert_eq!(run(&p, 0xc000_003e, 7, 9), deny);
        assert_eq!(run(&p, 0xc000_003e, 8, 2), allow);
        assert_eq!(run(&p, 0xc000_003e, 8, 40), deny);
        assert_eq!(run(&p, 0x4000_0003, 0, 0), libc::SECCOMP_RET_KILL_PROCESS);
        assert_eq!(run(&p, 0xc000_003e, 0x4000_0000, 0), deny);
    }
}
