"""The SASS helpers of benchmarks/scan_ncu.py on a hand-written listing."""

import pytest

from benchmarks.scan_ncu import (
    NO_BARRIER,
    _opcode,
    control,
    functions,
    inner_loops,
    innermost_loop,
    instructions,
    load_waits,
    main,
)

LISTING = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */
        /*0010*/                   FMUL R2, R3, R4 ;               /* 0x0000000403027220 */
        /*0020*/                   MUFU.EX2 R5, R2 ;               /* 0x0000000002057308 */
        /*0030*/                   FFMA R6, R5, R6, R7 ;           /* 0x0000000605067223 */
        /*0040*/              @!P0 BRA 0x20 ;                      /* 0x000000000000a947 */
        /*0050*/                   SHFL.BFLY PT, R8, R6, 0x1, 0x1f ;  /* 0x0c201f0006087f89 */
        /*0060*/               @P1 BRA 0x10 ;                      /* 0x0000000000001947 */
        /*0070*/                   BRA 0x90 ;                      /* 0x0000000000007947 */
        /*0080*/                   NOP ;                           /* 0x0000000000007918 */
        /*0090*/                   EXIT ;                          /* 0x000000000000794d */
"""


def test_innermost_loop_is_a_backward_branch_with_no_loop_inside():
    loop = innermost_loop(LISTING)
    assert [_opcode(t) for t in loop] == ["MUFU", "FFMA", "BRA"]


def test_of_two_inner_loops_the_longer_is_the_step_loop():
    # A second inner loop after the first (0x50..0x70 branching back to 0x50) and longer.
    listing = LISTING.replace("@P1 BRA 0x10", "FADD R8, R8, R6").replace(
        "BRA 0x90", "@P1 BRA 0x50")
    assert [[_opcode(x.text) for x in loop] for loop in inner_loops(instructions(listing))] == [
        ["MUFU", "FFMA", "BRA"], ["SHFL", "FADD", "BRA"]]
    longer = listing.replace("FADD R8, R8, R6",
                             "FADD R8, R8, R6 ;\n        /*0065*/  FMUL R8, R8, R6")
    assert [_opcode(t) for t in innermost_loop(longer)] == ["SHFL", "FADD", "FMUL", "BRA"]


def test_opcode_drops_predicate_and_modifiers():
    assert _opcode("@!P0 BRA 0x20") == "BRA"
    assert _opcode("  MUFU.EX2 R5, R2") == "MUFU"
    assert _opcode("") == "?"


def test_no_loop_gives_nothing():
    assert innermost_loop(LISTING.replace("BRA 0x20", "BRA 0x80").replace(
        "BRA 0x10", "BRA 0x80")) == []


def test_control_words_of_real_sm90_code_pair_results_and_sources_with_their_waits():
    # Instructions as cuobjdump prints them for a kernel compiled by ptxas for sm_90. MUFU
    # writes R94 and reads R44 asynchronously: the MOV that overwrites R44 must wait until
    # R44 was read, the FADD that reads R94 until R94 was written; the LDG then reuses the
    # scoreboard that the MOV cleared.
    listing = """
        /*3480*/                   MUFU.EX2 R94, R44 ;                  /* 0x0000002c005e7308 */
                                                                        /* 0x0004e20000000800 */
        /*3500*/                   MOV R44, UR17 ;                      /* 0x00000011002c7c02 */
                                                                        /* 0x004fe40008000f00 */
        /*3510*/                   MOV R59, UR5 ;                       /* 0x00000005003b7c02 */
                                                                        /* 0x000fe40008000f00 */
        /*3530*/                   FADD R45, R94, 1 ;                   /* 0x3f8000005e2d7421 */
                                                                        /* 0x008fc80000000000 */
        /*35c0*/              @!P1 LDG.E.U16 R69, desc[UR12][R52.64] ;  /* 0x0000000c34459981 */
                                                                        /* 0x000ea6000c1e1500 */
    """
    mufu, mov_r44, mov_r59, fadd, ldg = (control(x.high) for x in instructions(listing))
    assert NO_BARRIER not in (mufu.write, mufu.read) and mufu.write != mufu.read
    assert mov_r44.wait == 1 << mufu.read
    assert mov_r59.wait == 0 and mov_r59.write == mov_r59.read == NO_BARRIER
    assert fadd.wait == 1 << mufu.write
    assert ldg.write == mufu.read  # free again once the MOV has waited on it


def _word(write=NO_BARRIER, wait=()):
    return (write << 46) | (NO_BARRIER << 49) | (sum(1 << b for b in wait) << 52)


def _listing(rows):
    lines = []
    for i, (text, high) in enumerate(rows):
        lines.append(f"        /*{16 * i:04x}*/  {text} ;  /* 0x{0:016x} */")
        lines.append(f"                           /* 0x{high:016x} */")
    return "\n".join(lines)


def test_load_waits_finds_a_wait_that_shares_a_scoreboard_with_prefetched_loads():
    loop = instructions(_listing([
        ("LDG.E R10, desc[UR4][R2.64]", _word(write=2)),  # loads for the next iteration
        ("LDG.E R11, desc[UR4][R4.64]", _word(write=2)),
        ("MUFU.EX2 R5, R6", _word(write=2)),  # scoreboards ran out: shares 2
        ("FMUL R7, R5, R5", _word(wait=(2,))),  # wants R5, waits for the loads too
        ("FADD R8, R7, R7", _word()),
        ("LDG.E R12, desc[UR4][R2.64]", _word(write=3)),
        ("FADD R9, R12, R10", _word(wait=(3,))),  # consumes a load: no other producer
        ("BRA 0x0", _word()),
    ]))
    waits = load_waits(loop)
    assert [(w.text.split()[0], w.loads, w.others, w.distance) for w in waits] == [
        ("FMUL", 2, ("MUFU",), 2), ("FADD", 1, (), 1)]


def test_load_waits_sees_loads_pending_from_the_previous_iteration():
    loop = instructions(_listing([
        ("FADD R9, R12, R10", _word(wait=(4,))),  # the top of the loop consumes them
        ("FMUL R7, R5, R5", _word()),
        ("LDG.E R12, desc[UR4][R2.64]", _word(write=4)),
        ("BRA 0x0", _word()),
    ]))
    assert [(w.loads, w.others, w.distance) for w in load_waits(loop)] == [(1, (), 2)]


def test_load_waits_needs_control_words():
    with pytest.raises(ValueError, match="control words"):
        load_waits(instructions(LISTING))


def test_functions_splits_a_dump_by_kernel(tmp_path, capsys):
    dump = ("\n\tcode for sm_90\n\t\tFunction : kernel_a\n" + LISTING
            + "\n\t\tFunction : kernel_b\n" + LISTING.replace("MUFU.EX2", "MUFU.LG2"))
    found = functions(dump)
    assert list(found) == ["kernel_a", "kernel_b"]
    assert "MUFU.LG2" in found["kernel_b"] and "MUFU.LG2" not in found["kernel_a"]
    path = tmp_path / "dump.txt"
    path.write_text(dump)
    with pytest.raises(SystemExit, match="kernel_a, kernel_b"):
        main(["waits", str(path), "--kernel", "selective_scan"])
