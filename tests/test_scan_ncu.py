"""The SASS helpers of benchmarks/scan_ncu.py on a hand-written listing."""

from benchmarks.scan_ncu import _opcode, innermost_loop

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


def test_innermost_loop_is_the_shortest_backward_branch():
    loop = innermost_loop(LISTING)
    assert [_opcode(t) for t in loop] == ["MUFU", "FFMA", "BRA"]


def test_opcode_drops_predicate_and_modifiers():
    assert _opcode("@!P0 BRA 0x20") == "BRA"
    assert _opcode("  MUFU.EX2 R5, R2") == "MUFU"
    assert _opcode("") == "?"


def test_no_loop_gives_nothing():
    assert innermost_loop(LISTING.replace("BRA 0x20", "BRA 0x80").replace(
        "BRA 0x10", "BRA 0x80")) == []
