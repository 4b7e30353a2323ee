"""The command line of deepexplain: ``python deepexplain.py COMMAND ...`` (or ``deepexplain COMMAND ...``).

Commands, each a function registered on its subparser with ``set_defaults(func=...)``:

* ``explain IMAGE``: explain an image's top class and write the map, the panels, the map over the whole photo
  and a JSON summary;
* ``train``: train the embedded shapes model (or the planted-shortcut one);
* ``evaluate``: score every explanation method on the embedded scenes (:mod:`deepexplain_eval`);
* ``bench``: time the seed preset against the fast configuration (:mod:`deepexplain_bench`);
* ``audit SOURCE``: explain every image of a folder (or embedded scenes) resumably (:mod:`deepexplain_audit`).

Every setting of :data:`deepexplain.SETTINGS` is an ``explain`` option, with its
type, allowed values, help and each preset's value taken from its declaration;
``explain --help`` ends with what each preset is. A warning is one line on
stderr (``deepexplain: note: ...``). Bad input ends with one line on stderr and exit status 2; Ctrl-C at
any moment with one line and exit status 130, SIGTERM with exit status 143; outputs are written all or none (:mod:`deepexplain_io`).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Sequence

from deepexplain_io import Terminated, sigterm_raises

# The project's modules import torch, which takes seconds: they are imported inside main(), after the signal
# handlers are set, so that a Ctrl-C or SIGTERM during start-up ends with one line too.
de = audit = bench = ev = scenes = None

__all__ = ["parser", "main"]

DEVICES = ("cpu", "cuda")
_WIDTH = 79  # of the help's own paragraphs


def _setting_help(spec: de.SettingSpec) -> str:
    """A setting's --help line: what it does, what it takes, its default and which preset it comes from, and
    the value each other preset gives it."""
    default = spec.value_in(de.DEFAULT_PRESET)
    others = [preset for preset in de.PRESET_BASES if preset != de.DEFAULT_PRESET]
    if all(spec.value_in(preset) == default for preset in others):
        return f"{spec.help}; {spec.allowed()}; default: {default} (every preset)"
    values = "; ".join(f"{preset}: {spec.value_in(preset)}" for preset in others)
    return f"{spec.help}; {spec.allowed()}; default: {default} ({de.DEFAULT_PRESET} preset); {values}"


def _presets_epilog() -> str:
    """``explain --help``'s closing paragraph: each preset, what it is and the values it changes."""
    lines = textwrap.wrap("presets (--preset): every setting above takes its value from the preset unless its "
                          "option is given; each preset changes some values of the one before it.", _WIDTH)
    for preset, base in de.PRESET_BASES.items():
        changed = [f"--{name.replace('_', '-')} {value}" for name, value in de.PRESETS[preset].items()
                   if base is not None and value != de.PRESETS[base][name]]
        text = (f"{preset}{' (the default)' * (preset == de.DEFAULT_PRESET)}: {de.PRESET_DESCRIPTIONS[preset]}"
                + (f"; = {base} with {', '.join(changed)}" if changed else ""))
        lines += textwrap.wrap(text, _WIDTH, initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def _add_settings(command: argparse.ArgumentParser) -> None:
    """One option per setting, in a group per stage; unset options keep the preset's value."""
    groups = {stage.STAGE: command.add_argument_group(f"{stage.STAGE} settings") for stage in de.STAGES}
    for spec in de.SETTINGS.values():
        groups[spec.stage].add_argument(f"--{spec.name.replace('_', '-')}", dest=spec.name, type=spec.type,
                                        metavar=spec.type.__name__.upper(), help=_setting_help(spec))


def _check_output_folder(path: Path) -> None:
    """Fail before any work when the output folder cannot be one (a file of that name is in the way)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--out {path} is a file, not a folder")


def _explain(args: argparse.Namespace) -> None:
    _check_output_folder(args.out)
    values = {name: getattr(args, name) for name in de.SETTINGS}
    result = de.explain(args.image, args.model, preset=args.preset, target=args.target, seed=args.seed,
                        device=args.device, weights_path=args.weights, **values)  # prints result.result_line()
    for path in de.save_outputs(result, args.out, Path(args.image).stem, image=args.image):
        print(f"wrote {path}")


def _train(args: argparse.Namespace) -> None:
    if args.shortcut:
        out, options = scenes.SHORTCUT_WEIGHTS_PATH, {**scenes.SHORTCUT_TRAINING, "marked": True}
    else:
        out, options = scenes.WEIGHTS_PATH, {}
    print(json.dumps(scenes.train(args.out or out, **options), indent=2, allow_nan=False))


def _evaluate(args: argparse.Namespace) -> None:
    _check_output_folder(args.out)
    if args.images is not None:
        result = ev.evaluate_photos(args.images, args.model, args.methods, weights_path=args.weights,
                                    split=args.split, first=args.first, every=args.every, limit=args.limit,
                                    steps=args.steps,
                                    sanity_images=2 if args.sanity_scenes is None else args.sanity_scenes,
                                    device=args.device)
    else:
        result = ev.evaluate(args.scenes, args.model, args.methods, steps=args.steps,
                             sanity_scenes=5 if args.sanity_scenes is None else args.sanity_scenes,
                             shortcut_scenes=args.shortcut_scenes,
                             device=args.device)
    for path in ev.write_report(result, args.out, " ".join(["python deepexplain.py", *args.argv])):
        print(f"wrote {path}")
    print(ev.photo_table(result) if args.images is not None else ev.main_table(result))


def _bench(args: argparse.Namespace) -> None:
    print(bench.benchmark(args.model, args.images, args.batch, args.quick, args.device, args.weights)[2])


def _audit(args: argparse.Namespace) -> None:
    values = {name: getattr(args, name) for name in de.SETTINGS}
    summary = audit.audit(args.source, args.out, model=args.model, weights=args.weights, preset=args.preset,
                          batch=args.batch, limit=args.limit, resume=args.resume, device=args.device, **values)
    if summary is None:  # one of torchrun's ranks other than 0: rank 0 merges and reports
        return
    print("\n".join([*summary.class_lines(), summary.line(), f"report: {Path(args.out) / 'report.html'}"]))


def _explain_parser(commands) -> None:
    ex = commands.add_parser(
        "explain", help="explain an image's top class and write the results",
        description=f"Explain an image's top class. The settings come from --preset (default "
                    f"{de.DEFAULT_PRESET}); an option given here changes one of them.",
        epilog=_presets_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("image", help="a JPEG/PNG/GIF file, or an embedded sample's name (e.g. star)")
    ex.add_argument("--model", default="auto", help="auto, vgg19, shapes or a torchvision model name")
    ex.add_argument("--weights", type=Path, help="a local state_dict file for the model's architecture")
    ex.add_argument("--target", type=int, help="class index to explain (default: the top class)")
    ex.add_argument("--preset", choices=list(de.PRESET_BASES),
                    help=f"a named set of values for every setting (default {de.DEFAULT_PRESET}; see the end)")
    ex.add_argument("--seed", type=int, default=0, help="random seed of the generator's initialisation")
    ex.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    ex.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    _add_settings(ex)
    ex.set_defaults(func=_explain)


def _audit_parser(commands) -> None:
    au = commands.add_parser(
        "audit", help="explain every image of a folder or of embedded scenes, resumably",
        description="Explain every image of SOURCE in batches into --out: audit.csv (one row per image), "
                    "errors.csv, the maps (batches/*.npz), class_means.npz, settings.json and summary.json. "
                    "A run stopped at any moment loses at most the batch in flight; --resume continues it.")
    au.add_argument("source", help="a folder of images (searched recursively; one sub-folder per class gives "
                                   "the true labels), or scenes:N / shortcut:N (embedded scenes)")
    au.add_argument("--model", help="auto (default), vgg19, shapes or a torchvision model name; embedded "
                                    "sources use their own model")
    au.add_argument("--weights", type=Path, help="a local state_dict file for the model's architecture")
    au.add_argument("--out", type=Path, required=True, help="output folder")
    au.add_argument("--preset", choices=list(de.PRESET_BASES),
                    help=f"a named set of values for every setting (default {de.DEFAULT_PRESET})")
    au.add_argument("--batch", type=int, default=16, help="images per explain_batch call (default 16)")
    au.add_argument("--limit", type=int, help="audit only the first N images of the source")
    au.add_argument("--resume", action="store_true", help="continue the audit in --out, skipping done images")
    au.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    _add_settings(au)
    au.set_defaults(func=_audit)


def _train_parser(commands) -> None:
    tr = commands.add_parser("train", help="train the embedded shapes model (or the planted-shortcut one)")
    tr.add_argument("--shortcut", action="store_true",
                    help="train the planted-shortcut model on tagged scenes (saved beside the embedded model)")
    tr.add_argument("--out", type=Path, help="where to save the weights (default: data/)")
    tr.set_defaults(func=_train)


def _evaluate_parser(commands) -> None:
    ev_ = commands.add_parser("evaluate", help="score every explanation method on the embedded scenes "
                              "(or, with --images, on a folder of photos)")
    ev_.add_argument("--scenes", type=int, default=100, help="scenes to explain (default 100)")
    ev_.add_argument("--model", default="shapes", help="the model to explain (default shapes)")
    ev_.add_argument("--weights", type=Path, help="a local state_dict file for the model's architecture")
    ev_.add_argument("--methods", nargs="+", metavar="METHOD",
                     help=f"methods to run, from: {' '.join(ev.METHODS)} (default: {' '.join(ev.SCENE_METHODS)}; "
                          f"with --images: {' '.join(ev.PHOTO_METHODS)})")
    ev_.add_argument("--steps", type=int, help="override the optimizing methods' steps (quick runs)")
    photos = ev_.add_argument_group("photos (deletion/insertion only: photos have no ground truth)")
    photos.add_argument("--images", type=Path, metavar="DIR",
                        help="explain the photos of DIR (in the order of its labels.csv, else by name) "
                             "instead of the embedded scenes; the target is the model's top class")
    photos.add_argument("--split", choices=ev.SPLITS, default="all",
                        help=f"photos of every row, of the even rows (tuning: {ev.TUNING_SPLIT}) or of the "
                             f"odd rows (report: {ev.REPORT_SPLIT}); default all")
    photos.add_argument("--first", type=int, default=0, help="skip this many photos of the split (default 0)")
    photos.add_argument("--every", type=int, default=1,
                        help="then take every Nth photo: a sample across a folder sorted by class (default 1)")
    photos.add_argument("--limit", type=int, help="explain at most this many photos (default all)")
    ev_.add_argument("--sanity-scenes", type=int,
                     help="scenes for the randomization check (default 5; with --images, photos, default 2)")
    ev_.add_argument("--shortcut-scenes", type=int, default=20, help="scenes for the planted shortcut")
    ev_.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    ev_.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder (default evaluation/)")
    ev_.set_defaults(func=_evaluate)


def _bench_parser(commands) -> None:
    be = commands.add_parser("bench", help="time the seed preset against the fast configuration")
    be.add_argument("--model", default="shapes", help="shapes (default), vgg19 or a torchvision model name; "
                    "without its pretrained weights a torchvision model runs with random ones")
    be.add_argument("--weights", type=Path, help="a local state_dict file for the model's architecture")
    be.add_argument("--images", type=int, default=20, help="embedded scenes to explain (default 20)")
    be.add_argument("--batch", type=int, default=16, help="images per batched optimization (default 16)")
    be.add_argument("--quick", action="store_true", help="2 scenes, 10 steps: a smoke run, not a measurement")
    be.add_argument("--device", choices=DEVICES, help="default: cuda when available")
    be.set_defaults(func=_bench)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, with a usage error on one line (``deepexplain: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"deepexplain: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The command line's parser, one subparser per command."""
    _import_modules()
    top = _Parser(prog="deepexplain.py", description=de.__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    for add in (_explain_parser, _train_parser, _evaluate_parser, _bench_parser, _audit_parser):
        add(commands)
    return top


def _import_modules() -> None:
    """Import the project's modules (and torch) into this module's globals."""
    global de, audit, bench, ev, scenes
    import deepexplain as de
    import deepexplain_audit as audit
    import deepexplain_bench as bench
    import deepexplain_eval as ev
    import deepexplain_scenes as scenes


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one line on stderr: ``deepexplain: note: ...`` (``warning:`` for Python's own kinds)."""
    kind = "note" if category.__module__ == "deepexplain" else category.__name__
    print(f"deepexplain: {kind}: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status: 0, 2 with a one-line message for bad input (argparse's
    own errors included), 130 for Ctrl-C and 143 for SIGTERM (each with one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with sigterm_raises(), warnings.catch_warnings():
            warnings.showwarning = _warning_line
            try:
                args = parser().parse_args(argv)
            except SystemExit as stop:  # --help, or argparse's one-line error (_Parser.error)
                return stop.code or 0
            args.argv = argv
            args.func(args)
        return 0
    except (ValueError, TypeError, OSError) as err:
        print(f"deepexplain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepexplain: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("deepexplain: terminated", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
