"""The scripts carry only the _lib.lua definitions they use (coretask/gateway/transport.py).

Server-free: the whole library would run fine, so these check the cut itself. That every
script still finds every helper it calls is shown by the suite, which runs every script on
real servers (a missing helper fails as a call of nil)."""
from __future__ import annotations


from coretask.gateway.transport import LUA_DIR, SCRIPTS, _code_words, _lib_parts, _with_lib

PARTS = _lib_parts((LUA_DIR / "_lib.lua").read_text())
LIB_NAMES = set().union(*(names for names, _ in PARTS))


def defined_in(source: str) -> set[str]:
    return {n for names, text in PARTS[1:] if text in source for n in names}


def test_every_top_level_statement_of_the_library_is_a_cut_point() -> None:
    # a statement that is not a `local` definition would be glued to the one before it
    for _, text in PARTS[1:]:
        for line in text.splitlines()[1:]:
            assert not line or line[0] in " \t-" or line == "end", f"top-level line inside a part: {line!r}"
    assert {"now_ms", "read_task", "take_out", "TASK_INTS", "UNCHECKED"} <= LIB_NAMES


def test_each_script_carries_every_library_name_it_uses_and_only_those() -> None:
    for name, script in SCRIPTS.items():
        words = _code_words(script.source[len(PARTS[0][1]):])
        assert words & LIB_NAMES <= defined_in(script.source), name
        body = (LUA_DIR / f"{name}.lua").read_text()
        assert script.source.endswith(body)


def test_a_small_script_leaves_the_rest_out_and_keeps_the_order() -> None:
    src = _with_lib(PARTS, "return now_ms()")
    assert "local function now_ms()" in src and "local function take_out(" not in src
    uses = _with_lib(PARTS, "return release_tenant(P, 't', 1)")
    assert uses.index("local function release_tenant(") > uses.index("-- _lib.lua")
    big = _with_lib(PARTS, "take_out(P, id, 'x', {}, 0)")
    assert big.index("local function set_aside(") < big.index("local function take_out(")
    assert len(SCRIPTS["progress"].source) < len(SCRIPTS["fail"].source)


def test_a_name_in_a_comment_pulls_nothing_in() -> None:
    # a comment naming a helper ("see take_out") must not make the script carry it
    src = _with_lib(PARTS, "-- unlike take_out(P, id, ...), this only reads\nreturn now_ms()")
    assert "local function take_out(" not in src and "local function now_ms()" in src
    assert _code_words("local a = b -- c d\n-- e\nf()") == {"local", "a", "b", "f"}
