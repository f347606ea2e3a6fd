"""The import graph of the library and the trainer has no cycles (issue 17): every ``import`` between
modules of ``visualchat`` and ``visualchat_train``, those inside functions included, read from the source."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("visualchat", "visualchat_train")


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of PACKAGES."""
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                    name = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
                    out[name] = os.path.join(d, f)
    return out


def imports_of(name: str, path: str, known: dict) -> set[str]:
    """The modules of ``known`` that module ``name`` imports anywhere in its source."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            subs = [f"{mod}.{a.name}" for a in node.names]
            # ``from pkg import submodule`` imports the submodule; ``from module import name``, the module
            targets = [t for t in subs if t in known] or [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    g = graph()
    assert "visualchat_train.dist" in g["visualchat_train.resume"] and "visualchat.config" in g["visualchat_train.config"]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_resume_and_trainer_do_not_import_each_other():
    g = graph()
    assert "visualchat_train.trainer" not in g["visualchat_train.resume"] and "visualchat_train.resume" in g["visualchat_train.trainer"]


def limit_variable_reads(source: str, names: set[str]) -> list[str]:
    """The limit variables ``source`` reads: a call given one of ``names`` as a positional argument
    (``os.environ.get(N)``, ``os.getenv(N)``, an ``_env(N, ...)`` helper) or a subscript by one
    (``os.environ[N]``). Names in messages, help texts or keyword arguments are not reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            args = node.args
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            args = [node.slice]
        else:
            continue
        found += [a.value for a in args if isinstance(a, ast.Constant) and a.value in names]
    return found


def test_only_the_limits_module_reads_limit_variables():
    """visualchat/limits.py (``Limits.from_env``) is the one reader of the VISUALCHAT_* limit variables."""
    from visualchat.limits import ENV

    names = set(ENV.values())
    assert limit_variable_reads('import os\nos.environ.get("VISUALCHAT_MAX_SIDE")\n_env("VISUALCHAT_MAX_PIXELS", 1)\n'
                                'os.environ["VISUALCHAT_MAX_ASPECT"]\nraise E("raise VISUALCHAT_MAX_SIDE", knob="VISUALCHAT_MAX_SIDE")',
                                names) == ["VISUALCHAT_MAX_SIDE", "VISUALCHAT_MAX_PIXELS", "VISUALCHAT_MAX_ASPECT"]
    files = [os.path.join(ROOT, "app.py")] + [os.path.join(d, f) for pkg in PACKAGES + ("webapp",)
                                              for d, _, fs in os.walk(os.path.join(ROOT, pkg)) for f in fs if f.endswith(".py")]
    readers = {os.path.relpath(f, ROOT): found for f in files
               if (found := limit_variable_reads(open(f, encoding="utf-8").read(), names))}
    readers.pop(os.path.join("visualchat", "limits.py"), None)
    assert not readers, readers


def test_the_fast_paths_do_not_import_the_reference():
    """visualchat/attention.py (MMCA's reference) picks a fast path through visualchat.kernels; the
    kernels never import the reference back (what they share is in visualchat.attention_common)."""
    g = graph()
    kernels = [m for m in g if m == "visualchat.kernels" or m.startswith("visualchat.kernels.")]
    assert "visualchat.kernels.mmca_torch" in kernels and "visualchat.kernels" in g["visualchat.attention"]
    assert not [m for m in kernels if "visualchat.attention" in g[m]]


def private_kernel_uses(path: str) -> list[str]:
    """``name (line)`` for each private name of a visualchat.kernels module that ``path`` imports or reads
    (``from visualchat.kernels.lowp import _Fp16``, ``lowp._Fp16``)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    inside = os.path.relpath(path, ROOT).replace(os.sep, "/").startswith("visualchat/")
    bound, out = set(), []  # the local names bound to a kernels module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and inside:  # relative imports inside visualchat: resolve against its path
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)[:-node.level]
                mod = ".".join(parts + ([mod] if mod else []))
            if mod == "visualchat.kernels" or mod.startswith("visualchat.kernels."):
                for a in node.names:
                    if a.name.startswith("_"):
                        out.append(f"{a.name} ({node.lineno})")
                    bound.add(a.asname or a.name)
            elif mod == "visualchat":
                bound.update(a.asname or a.name for a in node.names if a.name == "kernels")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("visualchat.kernels"):
                    bound.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                out.append(f"{node.attr} ({node.lineno})")
    return out


def test_nothing_outside_the_kernels_uses_their_private_names():
    files = [os.path.join(ROOT, "app.py")]
    for top in ("visualchat", "visualchat_train", "webapp", "bench"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            if not os.path.relpath(d, ROOT).replace(os.sep, "/").startswith("visualchat/kernels"):
                files += [os.path.join(d, f) for f in names if f.endswith(".py")]
    found = {os.path.relpath(f, ROOT): u for f in files if (u := private_kernel_uses(f))}
    assert not found, f"private names of visualchat.kernels used outside it: {found}"
    probe = os.path.join(ROOT, "tests", "test_lowp.py")  # the tests may: the checker sees them there
    assert any(u.startswith("_Fp16") for u in private_kernel_uses(probe))


def test_the_session_leaves_projection_and_decode_path_to_the_model():
    """visualchat/session.py asks the model for image rows (``VisualChatModel.image_embeds``) and its decode
    step (``VisualChat.decode_step``): it reads no projection attribute and imports no fast path."""
    path = os.path.join(ROOT, "visualchat", "session.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    reads = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not reads & {"projection", "per_token", "kind"} and "image_embeds" in reads
    assert not [m for m in graph()["visualchat.session"] if m.startswith("visualchat.kernels")]
