#!/usr/bin/env python3
"""Finds import cycles between the modules (files) of each crate under crates/.

A module is a source file (`backbone/layers.rs` is `backbone::layers`, `dist/mod.rs` is `dist`;
a file named by `#[path = "x.rs"] mod name;` is `name` inside the module that declares it).
An edge A -> B is a path in A that names B: `crate::b::...`, `super::...`, `self::...`, or a
child's name (`layers::Linears` in `backbone`), in `use` declarations (`as` renames included)
or written out in code, resolved to the longest module prefix that exists. Left out:
- paths to the crate root (`crate::Error`): the root's re-exports are not a design dependency;
- a module's references to its own ancestors (`super::Mode` in `backbone::layers`): a module
  lives inside its parent, so using the parent's items is not a cycle, while the parent using
  the child's items still counts, as do all references between modules neither of which
  contains the other;
- test code (`#[cfg(test)] mod ... { }` blocks and tests.rs files): a test may use anything.
Prints each cycle (a strongly connected set of modules with the edges inside it) and exits 1
when there is one.

    python3 scripts/check-module-cycles.py [crate-dir ...]
"""
import pathlib
import re
import sys


# `#[path = "x.rs"]`, other attributes, then `mod name;`.
PATH_MOD = re.compile(r'#\[path\s*=\s*"([^"]+)"\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;')


def module_of(src, path):
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_tests(text):
    """The text without `#[cfg(test)] mod ... { ... }` blocks and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def expand_use(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)
    m = re.match(r"^(.*?)\{(.*)\}$", tree)
    if not m:
        return [tree]
    prefix, inner = m.group(1), m.group(2)
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    items.append(cur)
    return [p for it in items if it for p in expand_use(prefix + it)]


def edges(src, modules, path):
    me = module_of(src, path)
    text = strip_tests(path.read_text())
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        paths += expand_use(m.group(1))
    paths += re.findall(r"(?<![\w:])((?:\w+)(?:::\w+)+)", text)
    out = set()
    for p in paths:
        parts = p.split("::")
        if parts[0] == "crate":
            base, rest = (), parts[1:]
        elif parts[0] in ("super", "self"):
            # In a file module `a/b.rs` (`a::b`), super is `a`; in `a/mod.rs` (`a`), super is
            # the root; self is the module itself.
            base = list(me)
            rest = parts
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    base = base[:-1]
                rest = rest[1:]
            base = tuple(base)
        elif me + (parts[0],) in modules:
            base, rest = me, parts  # a child module by its name
        else:
            continue  # another crate, the standard library, or a local name
        target = base
        for k in range(len(rest), 0, -1):
            if base + tuple(rest[:k]) in modules:
                target = base + tuple(rest[:k])
                break
        ancestor = target == me[: len(target)]
        if target and not ancestor and target in modules:
            out.add(target)
    return out


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    crates = [pathlib.Path(c) for c in sys.argv[1:]] or sorted((root / "crates").iterdir())
    bad = 0
    for crate in crates:
        src = crate / "src"
        if not src.is_dir():
            continue
        files = [f for f in src.rglob("*.rs") if f.name != "tests.rs"]
        modules = {module_of(src, f): f for f in files}
        for f in files:
            for target, name in PATH_MOD.findall(f.read_text()):
                moved = (f.parent / target).resolve()
                for m, g in list(modules.items()):
                    if g.resolve() == moved:
                        del modules[m]
                        modules[module_of(src, f) + (name,)] = g
        graph = {m: edges(src, modules, f) for m, f in modules.items()}
        for comp in cycles(graph):
            bad += 1
            names = ", ".join("::".join(m) for m in comp)
            print(f"{crate.name}: import cycle among {len(comp)} modules: {names}")
            members = set(comp)
            for m in comp:
                inside = sorted("::".join(t) for t in graph[m] if t in members)
                print(f"  {'::'.join(m)} -> {', '.join(inside)}")
        print(f"{crate.name}: {len(modules)} modules checked")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
