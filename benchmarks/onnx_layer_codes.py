"""Where an ONNX file's integers part from the fake-quant model's: layer by layer, as deployed and op for op.

    dgq_export runs/pacs_fqat --format onnx -o fqat.onnx
    python benchmarks/onnx_layer_codes.py runs/pacs_fqat fqat.onnx --images 32 --folder PACS/sketch

For each activation ``QuantizeLinear`` of the exported graph (in graph order), the graph is cut
after that node (after the ``Clip`` that narrows a grid below 8 bits; the codes are read minus the
zero point, so signed grids in uint8 with zero point 128 compare too) and run in onnxruntime twice, with graph optimizations on (the fusions of the
deployed file, e.g. QLinearConv, up to that layer) and off; its integer codes are compared with
the codes the fake-quant model's activation quantizer computes on the same images. A deployment
whose arithmetic is the trained one moves a few codes by one step (float sums in another order
put values on the other side of a rounding edge) and those differences grow with depth; a real
mismatch (a wrong sign, zero point, range or requantization) shows as a jump at one layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.pacs_deploy import held_out_images, load_run  # noqa: E402


def torch_codes(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    """The integer codes of every activation quantizer of the integer model, in call order."""
    from dg_quant.deploy.qdq import QuantizeDequantize, integer_model

    deployable, _plan = integer_model(model)
    codes: list[np.ndarray] = []

    def record(module: QuantizeDequantize, _inputs: Any, output: torch.Tensor) -> None:
        codes.append(torch.round(output / module.scale).to(torch.int32).numpy())

    for module in deployable.modules():
        if isinstance(module, QuantizeDequantize):
            module.register_forward_hook(record)
    with torch.inference_mode():
        deployable(x)
    return codes


def layer_codes(onnx_path: Path, x: np.ndarray, threads: int = 1) -> list[dict[str, Any]]:
    """For each activation QuantizeLinear: its name and its codes as deployed and op for op."""
    import onnx

    from dg_quant.deploy.onnx import onnx_session

    graph = onnx.load(str(onnx_path))
    inits = {i.name: i for i in graph.graph.initializer}
    nodes = [n for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    consumers: dict[str, list[Any]] = {}
    for n in graph.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, node in enumerate(nodes):
            # below 8 bits the codes are the output of the Clip on QuantizeLinear's integers
            users = consumers.get(node.output[0], [])
            last = users[0] if len(users) == 1 and users[0].op_type == "Clip" else node
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            zero_point = int(onnx.numpy_helper.to_array(zero)) if zero is not None else 0
            cut = Path(tmp) / f"cut{k}.onnx"
            onnx.save(_cut_after(graph, last, zero), str(cut))
            row = {"node": node.name or node.output[0], "input": node.input[0]}
            for key, optimize in (("deployed", True), ("op_for_op", False)):
                session = onnx_session(cut, threads=threads, optimize=optimize)
                row[key] = session.run(None, {"input": x})[0].astype(np.int32) - zero_point
            out.append(row)
    return out


def _cut_after(graph: Any, node: Any, zero: Any = None) -> Any:
    """A copy of ``graph`` whose only output is ``node``'s, without the nodes it does not need."""
    import onnx

    inits = {i.name: i for i in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}
    needed, stack = set(), [node.output[0]]
    while stack:
        value = stack.pop()
        producer = producers.get(value)
        if producer is None or id(producer) in needed:
            continue
        needed.add(id(producer))
        stack.extend(i for i in producer.input if i)
    cut = onnx.ModelProto()
    cut.CopyFrom(graph)
    kept = [n for n in graph.graph.node if id(n) in needed]
    del cut.graph.node[:]
    cut.graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(i for name, i in inits.items() if name in used)
    dtype = zero.data_type if zero is not None else onnx.TensorProto.UINT8
    del cut.graph.output[:]
    cut.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], dtype, None))
    del cut.graph.value_info[:]
    return cut


def compare_codes(want: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Fraction of codes that differ, and the largest difference in steps."""
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    return {"differ": float((diff > 0).mean()), "max_steps": int(diff.max()), "mean_steps": float(diff.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("onnx", type=Path, help="the file dgq_export --format onnx wrote from the run")
    parser.add_argument("--checkpoint", default="last")
    parser.add_argument("--folder", type=Path, required=True, help="CLASS/ image folders")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the per-layer table as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from dg_quant.deploy.onnx import onnx_session

    model, _path = load_run(args.run_dir, args.checkpoint)
    meta = onnx_session(args.onnx, threads=1).get_modelmeta().custom_metadata_map
    x, _y = held_out_images(args.folder, json.loads(meta["dg_quant.classes"]), model.transform, 1)
    x = x[np.linspace(0, len(x) - 1, args.images).astype(int)]
    want = torch_codes(model, x)
    layers = layer_codes(args.onnx, x.numpy())
    if len(want) != len(layers):
        raise SystemExit(f"{len(want)} activation quantizers in torch but {len(layers)} in the graph")
    rows = []
    print(f"{'k':>3} {'node':40s} {'deployed: differ max':>22s} {'op for op: differ max':>22s}")
    for k, (w, layer) in enumerate(zip(want, layers)):
        deployed = compare_codes(w, layer["deployed"])
        plain = compare_codes(w, layer["op_for_op"])
        rows.append({"layer": k, "node": layer["node"], "deployed": deployed, "op_for_op": plain})
        print(
            f"{k:3d} {layer['node'][:40]:40s} {deployed['differ']:13.5f} {deployed['max_steps']:8d} "
            f"{plain['differ']:13.5f} {plain['max_steps']:8d}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
