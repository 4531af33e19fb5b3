#!/usr/bin/env python
"""OMERO.script: run conic-qp on the images of datasets / images / plates from OMERO.web.

Upload it once as an OMERO administrator (the processor's Python environment must have
``conic-qp[omero]`` and torch installed; see docs/omero.md):

    omero script upload scripts/omero/Run_conic_qp.py --official

Users then find it in OMERO.web under the scripts icon (conic-qp > Run conic-qp), select a
dataset or images, and launch it. Results are written back to each image exactly as
``conic-qp omero predict`` writes them (table, GeoJSON attachment, key-value pairs, optional
capped ROIs, under conic-qp namespaces). The job runs as the user who launched it, with that
user's session: no credentials are involved.

OMERO.scripts run on the server's processor with a time limit and one job at a time per
processor slot; for large cohorts run ``conic-qp omero predict`` on a compute node instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import omero.scripts as scripts
from omero.gateway import BlitzGateway
from omero.rtypes import rlong, rstring

NAME = "Run_conic_qp.py"
DATA_TYPES = ("Dataset", "Image", "Project", "Plate")
WRITE_DEFAULT = "table,attachment,map"


def params() -> list[Any]:
    """The script's inputs, as OMERO.web shows them."""
    return [
        scripts.String(
            "Data_Type", optional=False, grouping="1", description="What the IDs are.",
            values=[rstring(t) for t in DATA_TYPES], default="Dataset",
        ),
        scripts.List(
            "IDs", optional=False, grouping="2", description="Dataset, image, project or plate ids."
        ).ofType(rlong(0)),
        scripts.String(
            "Model", optional=True, grouping="3",
            description="Checkpoint folder on the processor machine (empty: the bundled model).",
        ),
        scripts.Int("TTA_passes", optional=True, grouping="4", default=16, min=1,
                    description="Test-time augmentation passes (paper: 16)."),
        scripts.Bool("MC_dropout", optional=True, grouping="4.1", default=True),
        scripts.String("Write", optional=True, grouping="5", default=WRITE_DEFAULT,
                       description="Any of table,attachment,map,rois."),
        scripts.Int("Max_ROIs", optional=True, grouping="5.1", default=0, min=0,
                    description="Polygon ROIs per image (0: none; viewers slow down with many)."),
        scripts.Bool("Replace", optional=True, grouping="5.2", default=True,
                     description="Replace earlier conic-qp results (off: keep them)."),
        scripts.String("Regions", optional=True, grouping="6", default="rois",
                       values=[rstring("rois"), rstring("none")],
                       description="Compose per existing ROI, or whole tissue only."),
        scripts.Float("MPP", optional=True, grouping="7",
                      description="Level-0 um/px for images without a pixel size."),
        scripts.String("Device", optional=True, grouping="8", default="auto",
                       description="auto, cpu, cuda or cuda:N."),
        scripts.String("Output_folder", optional=True, grouping="9",
                       description="Local folder on the processor for outputs (default: temp)."),
        scripts.String("Message", grouping="99", out=True),
    ]  # fmt: skip


def run(client: Any) -> str:
    """Run the job on the script's own session; returns the message shown in OMERO.web."""
    from conic_qp.omero.connection import OmeroConnection
    from conic_qp.omero.jobs import run_omero_images
    from conic_qp.omero.refs import OmeroRef
    from conic_qp.omero.results import WriteOptions
    from conic_qp.predict import PredictSettings, default_model_path, load_models, resolve_device
    from conic_qp.tta import TTAConfig

    inputs = client.getInputs(unwrap=True)
    kind = str(inputs.get("Data_Type", "Dataset")).lower()
    refs = [OmeroRef(kind, int(i)) for i in inputs["IDs"]]  # type: ignore[arg-type]
    write = WriteOptions.parse(
        str(inputs.get("Write") or WRITE_DEFAULT),
        max_rois=int(inputs.get("Max_ROIs") or 0),
        replace=bool(inputs.get("Replace", True)),
    )
    device = str(inputs.get("Device") or "auto")
    model = inputs.get("Model") or default_model_path()
    if model is None:
        return "no model: give the Model folder (none is bundled)"
    settings = PredictSettings(
        tta=TTAConfig(passes=int(inputs.get("TTA_passes") or 16),
                      mc_dropout=bool(inputs.get("MC_dropout", True))),
        device=device, workers=max(1, min(4, (os.cpu_count() or 2) - 1)),
    )  # fmt: skip
    models = load_models([str(model)], device=resolve_device(device))
    out = inputs.get("Output_folder") or tempfile.mkdtemp(prefix="conic-qp-omero-script-")
    host = client.getProperty("omero.host") or "omero"
    port = client.getProperty("omero.port") or "4064"
    conn = BlitzGateway(client_obj=client)
    connection = OmeroConnection.from_gateway(conn, server=f"{host}:{port}")
    batch = run_omero_images(
        connection, refs, models, settings, out, write=write,
        mpp=inputs.get("MPP"), regions=str(inputs.get("Regions") or "rois"),  # type: ignore[arg-type]
    )  # fmt: skip
    done = [r for r in batch.images if r.status == "done"]
    nuclei = sum(r.n_nuclei for r in done)
    msg = f"{len(done)} image(s) done, {nuclei} nuclei"
    if batch.failures:
        msg += f"; {len(batch.failures)} failed: " + "; ".join(
            f"{k}: {v}" for k, v in list(batch.failures.items())[:5]
        )
    return msg


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    client = scripts.client(
        NAME,
        "Find, outline and classify nuclei in H&E images with conic-qp (CoNIC 2022 method) and "
        "write the results back: an OMERO.table, the QuPath GeoJSON, key-value pairs with the "
        "cell composition, and optionally capped polygon ROIs.",
        *params(),
        authors=["conic-qp developers"],
        version="0.1.0",
    )
    try:
        try:
            message = run(client)
        except Exception as exc:  # shown in OMERO.web instead of a traceback
            from conic_qp.errors import ConicQPError

            if not isinstance(exc, ConicQPError):
                raise
            message = f"error: {exc}"
        client.setOutput("Message", rstring(message))
    finally:
        client.closeSession()


if __name__ == "__main__":
    main()
