"""Features: how the PatchCore coreset covers the training patches, and UMAP maps of image and patch
embeddings coloured by split, defect type and score. Click a point to see its image."""
import streamlit as st

from core.app import figures
from core.data import read_image
from core.app.embeddings import patch_box
from core.app.jobs import EmbeddingJob
from core.app.viz import draw_outline
from ui import jobs, state, widgets

CHART_TITLES = {"images": "UMAP of image embeddings (each image's mean patch feature)",
                "patches": "UMAP of patch embeddings (a sample of each image's patches, its highest-scoring included)"}
COLOUR_NAMES = {"defect_patch": "inside a defect?"}


st.title("Features")
run = state.require_run()
record = state.store().get_dataset(run["dataset_id"])
detector = state.detector(run)
st.caption(f"Run **{state.run_caption(run)}** on {record['name']}")

if hasattr(detector, "coverage_radii_"):
    st.subheader("Coreset")
    radii = detector.coverage_radii_.numpy()
    card = run["model_card"].get("memory_bank", {})
    cols = st.columns(3)
    cols[0].metric("Coreset size", f"{len(radii):,} patches")
    cols[1].metric("From training patches", f"{card.get('from_training_patches', 0):,}")
    cols[2].metric("Final coverage radius", f"{radii[-1]:.3g}",
                   help="The largest distance from any training patch to its nearest coreset patch, measured "
                        "in the random projection used for the selection")
    st.plotly_chart(figures.coverage_figure(radii), key="coverage")

views = state.feature_views(run)
if views is None:
    st.subheader("Embedding maps")
    # The maps are a server job: leaving this page, or reloading it, finds the job again.
    job = jobs.board().latest("embedding", run_id=run["id"])
    snapshot = job.snapshot() if job is not None else None
    if snapshot is not None and snapshot.running:
        jobs.progress_panel(job)
        st.stop()
    if snapshot is not None and not job.seen:
        job.seen = True
        if snapshot.status == "failed":
            st.error(f"The embedding maps failed: {widgets.plain(snapshot.error)}")
        elif snapshot.status == "cancelled":
            st.info("Embedding maps cancelled.")
    st.markdown("UMAP maps of every image and of a sample of patches take a minute or two to compute; they are "
                "saved with the run, so this happens once. You can leave this page meanwhile.")
    if st.button("Compute embedding maps", type="primary", icon=":material/scatter_plot:"):
        jobs.start(EmbeddingJob(run, detector, state.dataset_images(record)))
        st.rerun()
    st.stop()

if views.bank is not None:
    st.plotly_chart(figures.bank_figure(views.bank), key="bank")

if len(views.images) < views.n_images_total:
    st.caption(f"{len(views.images)} of {views.n_images_total} images, drawn evenly from every split and defect type.")


def embedding_section(table, title: str, colours: list[str], hover: list[str], key: str, patches: bool) -> None:
    st.subheader(title)
    colour = st.radio("Colour by", colours, horizontal=True, key=f"colour_{key}",
                      format_func=lambda c: COLOUR_NAMES.get(c, c))
    chart, detail = st.columns([3, 1])
    with chart:
        # theme=None keeps the run's colour scale for scores (Streamlit's theme would replace it).
        event = st.plotly_chart(figures.embedding_figure(table, colour, CHART_TITLES[key], hover), key=f"chart_{key}",
                                theme=None, on_select="rerun", selection_mode="points")
    with detail:
        points = event.selection.points if event and event.selection else []
        if not points:
            st.caption("Hover a point for its details; click one to see its image here.")
            return
        row = table.iloc[int(points[0]["customdata"][0])]
        image_row = views.images.iloc[int(row["image"])] if patches else row
        image = read_image(image_row["path"])
        if patches:   # outline the patch in the image as the model saw it
            frame = detector.preprocess.image_to_frame(image)
            box = patch_box(views, int(row["row"]), int(row["col"]), frame.shape[:2])
            st.image(draw_outline(frame, box, (0, 220, 255)), caption=f"patch row {row['row']}, column {row['col']}")
        else:
            st.image(image)
        st.markdown(f"**{image_row['split']} / {image_row['defect']}**  \nscore {row['score']:.4g}")


embedding_section(views.images, "Images", ["split", "defect", "score"], ["split", "defect", "score", "path"],
                  "images", patches=False)
embedding_section(views.patches, "Patches", ["defect_patch", "split", "defect", "score"],
                  ["split", "defect", "score", "defect_patch"], "patches", patches=True)
