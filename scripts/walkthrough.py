"""Run the service walk-through (docs/walkthrough.md) on a fresh registry and write (or check) its
output blocks.

    python scripts/walkthrough.py                  # check: exit 1 and a diff when the page's shapes differ
    python scripts/walkthrough.py --write          # rewrite the blocks with this run's real output
    python scripts/walkthrough.py --epochs 1 --first-epochs 30 --width 0.125   # a fast run (the test's)

Each step's console block sits between ``<!-- walkthrough: NAME -->`` and ``<!-- end walkthrough:
NAME -->``. The commands live here, in ``STEPS``; the page's ``$ ...`` lines are written from them.
The script starts ``mwt serve`` on a fresh data directory and a free port, runs every command with
``bash`` (``localhost:8000`` pointed at that port, ``$H`` holding the admin key), and stops the
server at the end, always. JSON answers are reflowed to ``WIDTH`` columns.

The check compares shapes, not figures: the same commands, the same JSON keys at every depth and
the same text with numbers, ids, hashes and times masked. Figures differ run to run (and between
``--epochs``); names and structure may not.

The prose quotes figures of the run too: each sits between ``<!-- fig: NAME -->`` and
``<!-- /fig -->`` and is written from the blocks by ``FIGURES[NAME]`` (``--write``); the check
fails on a slot with no such figure or a figure that a fresh run's blocks cannot give.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mwt_core.config import TrainConfig
from mwt_core.models import default_width

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "walkthrough.md"
REGEN = "python scripts/walkthrough.py --write"
WIDTH = 100
SHOWN_PORT = 8000  # the port the page shows (the run uses a free one)
# What the page's walk-through runs with; the test passes smaller ones. Model 1 trains with
# every default but the run length: the kernel budget makes a 3-class module a fraction of the
# model within a few dozen epochs, and the default 200 keep the walk-through busy for most of
# an hour on a CPU. The other three train fewer epochs still.
FIRST_EPOCHS = 30
DEFAULT_EPOCHS = 10
DEFAULT_WIDTH = default_width(TrainConfig.arch)

Block = list[tuple[str, str]]  # (command, output) pairs


@dataclass(frozen=True)
class Step:
    """One block of the page: commands formatted with the run's values (``{epochs}``, ``{job1}``, ...)."""

    name: str
    commands: tuple[str, ...]


STEPS: tuple[Step, ...] = (
    Step("train", (
        "curl -s -X POST localhost:8000/api/v1/jobs -H \"$H\" -H 'Content-Type: application/json' "
        "-H 'Idempotency-Key: readme-demo-1' -d '{{\"dataset\": \"digits\", \"arch\": \"simcnn\", "
        "\"width\": {width}, \"epochs\": {first_epochs}}}'",
        "mwt submit --width {width} --epochs {epochs} --seed 1",
    )),
    Step("watch", (
        "curl -s localhost:8000/api/v1/jobs/{job1} -H \"$H\"",
        "curl -sN --max-time 5 localhost:8000/api/v1/jobs/{job1}/events -H \"$H\" | head -n 4 | cut -c 1-100",
        "mwt watch {job1}",
        "mwt watch {job2}",
    )),
    Step("models", (
        "mwt models",
        "curl -s 'localhost:8000/api/v1/modules?dataset=digits&class_name=3&model_id=1' -H \"$H\"",
    )),
    Step("download", (
        "curl -s -D - -o module3.tar localhost:8000/api/v1/modules/{module3}/download -H \"$H\"",
        "sha256sum module3.tar",
        "mwt download {module3} --out dl",
    )),
    Step("compose", (
        "curl -s -X POST localhost:8000/api/v1/compositions -H \"$H\" "
        "-H 'Content-Type: application/json' -d '{{\"model_id\": 1, \"classes\": [3, 5, 8]}}'",
        "mwt compose 1 3,5,8",
        "mwt download 1 --what model --out dl",
        "mwt extract dl/digits-simcnn-v1 --classes 3,5,8 --out m358 --device cpu",
    )),
    Step("compose-models", (
        "curl -s -X POST localhost:8000/api/v1/compositions -H \"$H\" "
        "-H 'Content-Type: application/json' -d '{{\"sources\": [{{\"model_id\": 1, \"classes\": "
        "[3, 5]}}, {{\"model_id\": 2, \"classes\": [8, 9]}}]}}'",
        "mwt compose 1 0,1,2,3,4 --with 2:5,6,7,8,9",
        "mwt compose 1 3,5 --with 2:8,9 --combine head",
    )),
    Step("compose-disjoint", (
        "python -c \"import numpy as np; from mwt_core.compose import class_subset; "
        "from mwt_core.data.datasets import load_dataset; d = load_dataset('digits'); "
        "subs = {{f'digits{{c[0]}}{{c[-1]}}': class_subset(d, c) for c in ([0, 1, 2, 3, 4], "
        "[5, 6, 7, 8, 9])}}; [np.savez(f'{{n}}.npz', x_train=s.train_x, y_train=s.train_y, "
        "x_test=s.test_x, y_test=s.test_y, class_names=s.class_names) for n, s in subs.items()]; "
        "[print(f'{{n}}.npz', s.class_names, len(s.train_y), 'train', len(s.test_y), 'test') "
        "for n, s in subs.items()]\"",
        "curl -s -X POST localhost:8000/api/v1/datasets -H \"$H\" -F file=@digits04.npz",
        "curl -s -X POST localhost:8000/api/v1/datasets -H \"$H\" -F file=@digits59.npz",
        "mwt submit --dataset digits04 --width {width} --epochs {epochs}",
        "mwt submit --dataset digits59 --width {width} --epochs {epochs}",
        "mwt watch {job3}",
        "mwt watch {job4}",
        "curl -s -X POST localhost:8000/api/v1/compositions -H \"$H\" "
        "-H 'Content-Type: application/json' -d '{{\"sources\": [{{\"model_id\": {model3}, "
        "\"classes\": [0, 1, 2, 3, 4]}}, {{\"model_id\": {model4}, \"classes\": "
        "[\"5\", \"6\", \"7\", \"8\", \"9\"]}}]}}'",
    )),
    Step("compose-modules", (
        "curl -s -X POST localhost:8000/api/v1/compositions -H \"$H\" "
        "-H 'Content-Type: application/json' "
        "-d '{{\"modules\": [{mod_1_3}, {mod_2_8}, {mod_1_5}, {mod_2_0}]}}'",
        "for id in {mod_1_3} {mod_2_8} {mod_1_5} {mod_2_0}; do mwt download $id --out dl; done",
        "mwt compose-local dl/digits-simcnn-v1-class3 dl/digits-simcnn-v2-class8 "
        "dl/digits-simcnn-v1-class5 dl/digits-simcnn-v2-class0 --out c3850",
    )),
)


# ------------------------------------------------------------------------------- formatting


def reflow_json(value: Any, col: int = 0, width: int = WIDTH) -> str:
    """``value`` as JSON that fits ``width`` columns where it can: an object or list too long for
    its line has its items packed greedily, continuation lines indented under its bracket (a long
    string stays whole). Still valid JSON; ``col`` is the column ``value`` starts at."""
    flat = json.dumps(value)
    if col + len(flat) <= width or not isinstance(value, dict | list) or not value:
        return flat
    is_dict = isinstance(value, dict)
    entries = ([(json.dumps(k) + ": ", v) for k, v in value.items()] if isinstance(value, dict)
               else [("", v) for v in value])
    out, pos = ("{" if is_dict else "["), col + 1
    for i, (prefix, item) in enumerate(entries):
        end = "," if i < len(entries) - 1 else ("}" if is_dict else "]")
        if i and pos + 1 + len(prefix + json.dumps(item) + end) > width:
            out, pos = out + "\n" + " " * (col + 1), col + 1
        elif i:
            out, pos = out + " ", pos + 1
        piece = prefix + reflow_json(item, pos + len(prefix), width) + end
        out += piece
        pos = len(piece.rsplit("\n", 1)[1]) if "\n" in piece else pos + len(piece)
    return out


def _format_output(raw: str) -> str:
    text = raw.replace("\r\n", "\n").rstrip("\n")
    try:
        return reflow_json(json.loads(text))
    except ValueError:
        return "\n".join(line.rstrip() for line in text.split("\n"))


def render_block(pairs: Block) -> str:
    """A ``console`` fence: each ``$ command`` followed by its output."""
    lines = ["```console"]
    for i, (command, output) in enumerate(pairs):
        if i and lines[-1] != "":
            lines.append("")
        lines.append(f"$ {command}")
        if output:
            lines.append(output)
    lines.append("```")
    return "\n".join(lines)


def parse_block(body: str) -> Block:
    """The (command, output) pairs of a block written by ``render_block``."""
    pairs: Block = []
    for line in body.strip("\n").splitlines():
        if line.startswith("```"):
            continue
        if line.startswith("$ "):
            pairs.append((line[2:], ""))
        elif pairs:
            command, output = pairs[-1]
            pairs[-1] = (command, output + ("\n" if output else "") + line)
    return [(c, o.strip("\n")) for c, o in pairs]


# ----------------------------------------------------------------------------------- shapes

_MASKS = (
    (re.compile(r"\b\d{4}-\d\d-\d\dT[\d:.]+Z?"), "<time>"),
    (re.compile(r"\b[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} [\d:]+ GMT"), "<time>"),
    (re.compile(r"mwt_[A-Za-z0-9_-]{20,}"), "<key>"),
    # ids and sha256 (prefixes): one token with numbers, since a prefix may be all digits
    (re.compile(r"\b(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b"), "0"),
    # a sign is part of the figure (an accuracy difference is +0.00 pp in one run, -0.92 in another)
    (re.compile(r"[-+]?\d+(\.\d+)?(e-?\d+)?[kMG]?"), "0"),
    (re.compile(r"([━─═┈…])\1+"), r"\1"),
    (re.compile(r"\s+"), " "),
)


def mask(text: str) -> str:
    """``text`` with figures (numbers, ids, hashes, times) and column padding masked."""
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return text.strip()


def shape(value: Any) -> Any:
    """A JSON value's keys at every depth (a list by its first item); leaves become their type."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return "null" if value is None else "value"


def align(a: Any, b: Any) -> tuple[Any, Any]:
    """Two shapes with a null on either side matching whatever the other has there: a field that
    is null in one run and filled in another (a job's ``result`` before and after it ends) is a
    state, not a missing name."""
    if a == "null" or b == "null":
        return "null", "null"
    if isinstance(a, dict) and isinstance(b, dict):
        pairs = {k: align(a[k], b[k]) for k in a.keys() & b.keys()}
        return ({k: pairs[k][0] if k in pairs else v for k, v in a.items()},
                {k: pairs[k][1] if k in pairs else v for k, v in b.items()})
    if isinstance(a, list) and isinstance(b, list) and a and b:
        x, y = align(a[0], b[0])
        return [x], [y]
    return a, b


def output_shape(output: str) -> Any:
    """What the check compares of one command's output: the JSON shape, else the masked text."""
    try:
        return shape(json.loads(output))
    except ValueError:
        return mask(output)


def shape_diff(shown: Block, fresh: Block) -> list[str]:
    """Why a block of the page does not match a fresh run's (empty when the shapes agree)."""
    problems = []
    if [mask(c) for c, _ in shown] != [mask(c) for c, _ in fresh]:
        problems.append("commands differ:\n" + "\n".join(difflib.unified_diff(
            [c for c, _ in shown], [c for c, _ in fresh], "page", "script", lineterm="")))
        return problems
    for (command, out_shown), (_, out_fresh) in zip(shown, fresh, strict=True):
        a, b = align(output_shape(out_shown), output_shape(out_fresh))
        if a != b:
            problems.append(f"`$ {command}` output differs:\n" + "\n".join(difflib.unified_diff(
                json.dumps(a, indent=1).splitlines(), json.dumps(b, indent=1).splitlines(),
                "page", "fresh run", lineterm="")))
    return problems


# -------------------------------------------------------------------------------- the run


def _api(port: int, key: str, path: str) -> Any:
    import httpx

    r = httpx.get(f"http://127.0.0.1:{port}/api/v1{path}",
                  headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    return r.json()


def run_walkthrough(epochs: int, width: float, first_epochs: int | None = None,
                    timeout: float = 2400.0) -> dict[str, Block]:
    """Start ``mwt serve`` on a fresh registry, run every step, stop the server; the blocks."""
    sys.path.insert(0, str(ROOT))
    from tests.support.processes import ServiceProcess, clean_env, wait_http
    from tests.support.services import free_port

    with tempfile.TemporaryDirectory(prefix="mwt-walkthrough-") as tmp:
        work = Path(tmp)
        port = free_port()
        key_file = work / "admin.key"
        env = clean_env({"MWT_DATA_DIR": str(work / "data"), "COLUMNS": "160",
                         "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        server = ServiceProcess("serve", ["mwt", "serve", "--port", str(port), "--host",
                                          "127.0.0.1", "--key-file", str(key_file)], env, work)
        try:
            wait_http(f"http://127.0.0.1:{port}/api/v1/health", timeout=120, proc=server)
            key = key_file.read_text().strip()
            shell_env = {**env, "MWT_API_KEY": key, "MWT_URL": f"http://127.0.0.1:{port}",
                         "H": f"Authorization: Bearer {key}",
                         "PATH": str(Path(sys.executable).parent) + os.pathsep + env["PATH"]}
            (work / "cwd").mkdir()
            values: dict[str, Any] = {"epochs": epochs, "width": width,
                                      "first_epochs": epochs if first_epochs is None else first_epochs}
            blocks: dict[str, Block] = {}
            deadline = time.monotonic() + timeout
            for step in STEPS:
                pairs: Block = []
                for template in step.commands:
                    _before(step.name, template, values, port, key, deadline)
                    command = template.format(**values)
                    real = command.replace(f"localhost:{SHOWN_PORT}", f"127.0.0.1:{port}")
                    done = subprocess.run(["bash", "-o", "pipefail", "-c", real],
                                          cwd=work / "cwd", env=shell_env, capture_output=True,
                                          text=True, timeout=max(10.0, deadline - time.monotonic()))
                    # ``head`` closing an endless event stream (curl: 23, a write error) is the
                    # expected end of that command, and so is ``--max-time`` (28) when no further
                    # event came to close it first (a slow epoch on a loaded machine).
                    if done.returncode and ("head" not in command or done.returncode not in (23, 28)):
                        raise RuntimeError(f"`$ {command}` exited {done.returncode}:\n"
                                           f"{done.stdout}\n{done.stderr}")
                    output = _format_output(done.stdout.replace(f"127.0.0.1:{port}",
                                                                f"localhost:{SHOWN_PORT}"))
                    pairs.append((command, output))
                    _after(template, output, values)
                blocks[step.name] = pairs
            return blocks
        finally:
            server.stop()


def _after(template: str, output: str, values: dict[str, Any]) -> None:
    """Remember the ids later commands use: the jobs submitted, as ``job1``, ``job2``, ... in order."""
    if "/api/v1/jobs " in template + " " and template.startswith("curl -s -X POST"):
        values["job1"] = json.loads(output)["id"]
    elif template.startswith("mwt submit"):
        job = re.search(r"\b[0-9a-f]{32}\b", output).group(0)  # type: ignore[union-attr]
        values[f"job{sum(k.startswith('job') for k in values) + 1}"] = job


def _before(step: str, template: str, values: dict[str, Any], port: int, key: str,
            deadline: float) -> None:
    """Wait for what a command shows (a training step before the job's first GET) and look up the
    ids it names: ``{module3}``, ``{model3}`` (job 3's model), ``{mod_2_8}`` (model 2's module of
    class index 8), from the API, so the page never hard-codes an id the registry assigns."""
    if template.startswith("curl -s localhost:8000/api/v1/jobs/{job1}"):
        # The page shows job 1 training after an epoch has ended (its progress then has every
        # key an epoch end adds): wait for that, and say so plainly when the job got past training
        # first, which a shape diff of a later phase would not.
        while True:
            job = _api(port, key, f"/jobs/{values['job1']}")
            progress = job.get("progress") or {}
            phase = progress.get("phase")
            if job["status"] == "running" and phase == "training" and "checkpoint_epoch" in progress:
                break
            if job["status"] not in ("queued", "running") or phase not in (None, "loading data", "training"):
                raise RuntimeError(f"job 1 was past training ({job['status']}, {phase}) before the "
                                   "walk-through watched it: give it more epochs (--first-epochs)")
            if time.monotonic() > deadline:
                raise TimeoutError("job 1 reported no progress")
            time.sleep(0.1)
    if "{module3}" in template and "module3" not in values:
        page = _api(port, key, "/modules?dataset=digits&class_name=3&model_id=1")
        values["module3"] = page["items"][0]["id"]
    # {model3}: the model job 3 trains; {mod_2_8}: the module of model 2's class index 8.
    for name in set(re.findall(r"\{(model\d+|mod_\d+_\d+)\}", template)) - values.keys():
        if name.startswith("model"):
            values[name] = _api(port, key, f"/jobs/{values['job' + name[5:]]}")["model_id"]
        else:
            model_id, index = name.split("_")[1:]
            page = _api(port, key, f"/modules?model_id={model_id}&class_index={index}")
            values[name] = page["items"][0]["id"]


# ------------------------------------------------------------------------------ figures


def _output(blocks: dict[str, Block], step: str, command_start: str) -> str:
    """The output of the first command of ``step`` that starts with ``command_start``."""
    for command, output in blocks[step]:
        if command.startswith(command_start):
            return output
    raise KeyError(f"no `{command_start}...` command in step {step}")


def _json_output(blocks: dict[str, Block], step: str, command_start: str) -> Any:
    return json.loads(_output(blocks, step, command_start))


def _extract_ratio(row: str) -> Callable[[dict[str, Block]], str]:
    """The "module / full" cell of ``row`` in step 5's ``mwt extract`` table."""
    def get(blocks: dict[str, Block]) -> str:
        table = _output(blocks, "compose", "mwt extract")
        line = next(li for li in table.splitlines() if li.lstrip("│ ").startswith(row))
        return line.rstrip(" │").rsplit("│", 1)[1].strip()
    return get


def _watched_accuracy(model: int) -> Callable[[dict[str, Block]], str]:
    """Model ``model``'s test accuracy as ``mwt watch`` printed it in step 2."""
    def get(blocks: dict[str, Block]) -> str:
        text = "\n".join(out for _, out in blocks["watch"])
        m = re.search(rf"model {model} \(.*?\), accuracy ([\d.]+%)", text)
        if m is None:
            raise KeyError(f"step 2 shows no accuracy of model {model}")
        return m.group(1)
    return get


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _disjoint(key: str) -> Callable[[dict[str, Block]], str]:
    """A metric of step 7's composition (percent)."""
    def get(blocks: dict[str, Block]) -> str:
        return _pct(_json_output(blocks, "compose-disjoint", "curl -s -X POST localhost:8000/api/v1/compositions")
                    ["metrics"][key])
    return get


def _table_cell(output: str, column: str, row: int = 0) -> str:
    """The cell under the header starting with ``column`` in data row ``row`` of a rich table."""
    lines = output.splitlines()
    header = next(li for li in lines if li.startswith("┃"))
    names = [c.strip() for c in header.strip("┃").split("┃")]
    index = next(i for i, n in enumerate(names) if n.startswith(column))
    rows = [li for li in lines if li.startswith("│")]
    return rows[row].strip("│").split("│")[index].strip()


def _modules_composition(blocks: dict[str, Block]) -> dict[str, Any]:
    return _json_output(blocks, "compose-modules", "curl")


def _full_params(blocks: dict[str, Block]) -> str:
    table = _output(blocks, "compose", "mwt extract")
    line = next(li for li in table.splitlines() if li.lstrip("│ ").startswith("parameters"))
    return line.split("│")[3].strip()


FIGURES: dict[str, Callable[[dict[str, Block]], str]] = {
    "module358_params": _extract_ratio("parameters"),
    "module358_flops": _extract_ratio("FLOPs"),
    "module358_latency": _extract_ratio("CPU ms"),
    "model1_accuracy": _watched_accuracy(1),
    "model2_accuracy": _watched_accuracy(2),
    "models12_gauss_map": lambda b: _pct(_json_output(b, "compose-models", "curl")["accuracy"]),
    "models12_head": lambda b: _table_cell(_output(b, "compose-models", "mwt compose 1 3,5"), "accuracy"),
    "disjoint_accuracy": _disjoint("accuracy"),
    "disjoint_raw": _disjoint("raw_accuracy"),
    "disjoint_whole": _disjoint("baseline_accuracy"),
    "modules_accuracy": lambda b: _pct(_modules_composition(b)["accuracy"]),
    "modules_local_accuracy": lambda b: _table_cell(_output(b, "compose-modules", "mwt compose-local"),
                                                    "accuracy"),
    "modules_test_images": lambda b: str(_modules_composition(b)["metrics"]["test_samples"]),
    "modules_params": lambda b: f"{_modules_composition(b)['params'] / 1e6:.2f}M",
    "modules_flops": lambda b: f"{_modules_composition(b)['flops'] / 1e6:.1f}M",
    "model_params": _full_params,
}

_FIG = re.compile(r"(<!-- fig: ([\w-]+) -->)(.*?)(<!-- /fig -->)", re.S)


def figure_problems(text: str, blocks: dict[str, Block]) -> list[str]:
    """Slots naming no figure, and figures the blocks cannot give."""
    problems = []
    for m in _FIG.finditer(text):
        name = m.group(2)
        if name not in FIGURES:
            problems.append(f"[figure {name}] no such figure in scripts/walkthrough.py FIGURES")
            continue
        try:
            FIGURES[name](blocks)
        except (KeyError, IndexError, StopIteration, ValueError, TypeError) as exc:
            problems.append(f"[figure {name}] not in this run's output: {exc!r}")
    return problems


def write_figures(text: str, blocks: dict[str, Block]) -> str:
    """``text`` with every figure slot filled from ``blocks``."""
    return _FIG.sub(lambda m: m.group(1) + FIGURES[m.group(2)](blocks) + m.group(4), text)


# -------------------------------------------------------------------------------- the page


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- walkthrough: {re.escape(name)} -->\n)(.*?)"
                      rf"(<!-- end walkthrough: {re.escape(name)} -->)", re.S)


def shown_blocks(text: str) -> dict[str, Block]:
    """The page's walk-through blocks by step name."""
    blocks = {}
    for step in STEPS:
        m = _pattern(step.name).search(text)
        if m is None:
            raise SystemExit(f"error: {PAGE.relative_to(ROOT)} has no block "
                             f"`<!-- walkthrough: {step.name} -->`")
        blocks[step.name] = parse_block(m.group(2))
    return blocks


def write_blocks(text: str, blocks: dict[str, Block]) -> str:
    """``text`` with each step's block replaced by ``blocks``."""
    for name, pairs in blocks.items():
        body = render_block(pairs)

        def fill(m: re.Match[str], body: str = body) -> str:
            return m.group(1) + body + "\n" + m.group(3)

        text = _pattern(name).sub(fill, text)
    return text


def check(text: str, fresh: dict[str, Block]) -> list[str]:
    """Every difference in shape between the page's blocks and a fresh run's, and every figure
    slot a fresh run cannot fill."""
    shown = shown_blocks(text)
    return ([f"[{name}] {p}" for name in shown for p in shape_diff(shown[name], fresh[name])]
            + figure_problems(text, fresh))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the page's blocks")
    parser.add_argument("--page", type=Path, default=PAGE, help="the walk-through's page")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="of jobs 2-4")
    parser.add_argument("--first-epochs", type=int, default=FIRST_EPOCHS,
                        help="of job 1")
    parser.add_argument("--width", type=float, default=DEFAULT_WIDTH)
    args = parser.parse_args(argv)
    text = args.page.read_text()
    shown_blocks(text)  # fail on a missing marker before training anything
    start = time.monotonic()
    try:
        fresh = run_walkthrough(args.epochs, args.width, args.first_epochs)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - start
    if args.write:
        problems = figure_problems(text, fresh)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        args.page.write_text(write_figures(write_blocks(text, fresh), fresh))
        print(f"{args.page}: {len(fresh)} walk-through blocks written ({took:.0f} s)")
        return 0
    problems = check(text, fresh)
    if problems:
        print("\n\n".join(problems))
        print(f"error: {args.page}'s walk-through differs in shape; run `{REGEN}`", file=sys.stderr)
        return 1
    print(f"{args.page}: {len(fresh)} walk-through blocks match a fresh run ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
