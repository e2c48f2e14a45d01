"""The Tune tab's per-layer-group controls: "weights per" (a granularity), each vector's accordion of group
sliders, and the group view that drives them.

    from workbench.tabs.tune_groups import GRANULARITIES, granularity_of
    granularity, layout = granularity_of(session, {"ja@embed": 0.4, ...})   # "layer-groups:2", ["embed", ...]

:class:`GroupControls` is mixed into :class:`workbench.tabs.tune.TuneTab`, which builds the widgets
(``granularity``, ``accordions``, ``group_sliders``, ``group_view``) and the ``_syncs`` counter these methods use.
Why a view: Gradio rebuilds a component for every output update, even an empty one, so the 1 + 7 × max_vectors
controls are redrawn on a change of one per-session ``gr.State`` (:meth:`GroupControls.on_group_view`), not by
every page load and streamed release.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from optimer_lib.merging import groups
from workbench.session import Session

MAX_GROUPS = 6  # embed + up to 4 block slices + head
GRANULARITIES = ["vector", "layer-groups:1", "layer-groups:2", "layer-groups:4"]
VECTOR_VIEW: dict[str, Any] = {"granularity": "vector"}  # the group view of one α per vector: no group controls


def granularity_of(session: Session, weights: dict[str, float]) -> tuple[str, list[str]]:
    """The granularity whose layer groups the ``name@group`` keys of ``weights`` name, with its layout; else the
    coarsest that holds them exactly (every vector's weight the same across each of its groups); else the finest this
    model has (``("vector", [])`` when it has none).

    A mergekit recipe written from ``layer-groups:2`` joins a vector's equal neighbouring groups into one range
    (``ja@blocks0-3``): no layout names it, but ``layer-groups:2`` still holds it (:func:`on_layout`)."""
    names, layers = session.names, session.layers
    found: list[tuple[str, list[str]]] = []
    for g in GRANULARITIES[1:]:
        try:
            found.append((g, session.group_layout(g)))
        except Exception:  # fewer blocks than this granularity's slices
            continue
    named = set(groups.groups_in(weights))
    exact = next((f for f in found if set(f[1]) == named), None)
    if exact is None:
        table = groups.per_layer(weights, names, layers)
        positions = [groups.EMBED, *range(layers), groups.HEAD]  # per_layer's columns

        def uniform(group: str, name: str) -> bool:
            return len({w for w, pos in zip(table[name], positions, strict=True) if groups.contains(group, pos)}) == 1

        exact = next((f for f in found if all(uniform(grp, n) for grp in f[1] for n in names)), None)
    return exact or (found[-1] if found else ("vector", []))


def on_layout(session: Session, weights: dict[str, float]) -> dict[str, float]:
    """Grouped ``weights`` as one weight per vector and group of :func:`granularity_of`'s layout when that layout
    holds them exactly (a recipe's joined ranges become the Tune tab's own groups, which a reload restores); other
    weights as they are."""
    if not groups.is_grouped(weights):
        return weights
    names, layers = session.names, session.layers
    _, layout = granularity_of(session, weights)
    full = groups.expand(weights, names, layout)
    return full if groups.per_layer(full, names, layers) == groups.per_layer(weights, names, layers) else weights


class GroupControls:
    """The per-group methods of the Tune tab (see the module docstring)."""

    ctx: Any
    group_sliders: list[Any]
    _syncs: Any  # itertools.count(): see _resync_view

    def group_view_of(self, session: Session, weights: dict[str, float], granularity: str | None = None
                      ) -> dict[str, Any]:
        """What the per-group controls show for ``weights``: ``VECTOR_VIEW`` (one α per vector), else the
        granularity (taken from grouped weights when not given), the vector names, the group layout and every
        (vector, group) weight. Records the layout as the session's shown one (a release reads it)."""
        names = session.names
        layout = session.group_layout(granularity) if granularity else []
        if granularity is None and groups.is_grouped(weights):
            granularity, layout = granularity_of(session, weights)
        session.ui["tune_layout"] = layout  # what the group sliders show: a release reads them as this layout
        if not layout:
            return dict(VECTOR_VIEW)
        return {"granularity": granularity, "names": list(names), "layout": list(layout),
                "values": groups.expand(weights, names, layout)}

    def on_group_view(self, view: dict[str, Any] | None) -> list[Any]:
        """Updates of ``group_controls`` for a group view: the granularity, each vector's accordion and its
        group sliders (labels, values)."""
        view = view or VECTOR_VIEW
        names, layout, full = view.get("names", []), view.get("layout", []), view.get("values", {})
        accs = [gr.update(visible=bool(layout) and i < len(names)) for i in range(self.ctx.max_vectors)]
        sliders = []
        for i in range(self.ctx.max_vectors):
            for j in range(MAX_GROUPS):
                if layout and i < len(names) and j < len(layout):
                    key = groups.param_name(names[i], layout[j])
                    sliders.append(gr.update(visible=True, label=f"α {key}", value=full[key]))
                else:
                    sliders.append(gr.update(visible=False))
        return [gr.update(value=view.get("granularity") or "vector"), *accs, *sliders]

    def read_weights(self, session: Session, granularity: str, values: tuple[float, ...],
                     moved: tuple[str, int]) -> tuple[dict[str, float], float, list[str]]:
        """``(weights, instruction weight, layout)`` after a move, from the values its event sends (:meth:`inputs`).

        ``moved`` is ``("vector", i)``, ``("group", k)`` (slider k: vector k // MAX_GROUPS, group k % MAX_GROUPS),
        ``("instruction", 0)`` or ``("granularity", 0)``. Per vector, the vector sliders are read. Per layer group,
        only the moved slider is read and every other group keeps the session's Tune weight: the page's copy of
        a group slider can be stale or missing (the sliders of a collapsed accordion are not rendered), and the
        dropdown fires ``input`` again on blur. A vector's own slider sets all its groups. The instruction
        weight is the session's unless its slider moved.
        """
        kind, index = moved
        names = session.names
        tune = session.tune
        iw = float(values[-1]) if kind == "instruction" else tune.instruction_weight
        layout = session.group_layout(granularity)
        if len(layout) > MAX_GROUPS:
            raise ValueError(f"{granularity} has {len(layout)} groups, the tab shows at most {MAX_GROUPS}")
        if kind == "group" and (not layout or self.group_layout_shown(session) != layout):  # a layout gone
            return dict(tune.weights), iw, self.group_layout_shown(session)
        if not layout:
            return {n: float(values[i]) for i, n in enumerate(names)}, iw, layout
        weights = groups.expand(tune.weights, names, layout)  # a new layout starts from the current merge
        if kind == "vector" and index < len(names):
            weights.update({groups.param_name(names[index], g): float(values[index]) for g in layout})
        elif kind == "group":
            i, j = divmod(index, MAX_GROUPS)
            if i < len(names) and j < len(layout):
                weights[groups.param_name(names[i], layout[j])] = float(values[0])
        session.ui["tune_layout"] = layout
        return weights, iw, layout

    @staticmethod
    def group_layout_shown(session: Session) -> list[str]:
        return list(session.ui.get("tune_layout") or [])

    def _expand_fn(self, i: int):
        def fn(session: Session) -> list[Any]:
            layout, names = self.group_layout_shown(session), session.names
            full = groups.expand(session.tune.weights, names, layout) if layout and i < len(names) else {}
            return [gr.update(value=full[groups.param_name(names[i], g)]) if j < len(layout) and full
                    else gr.update() for j, g in enumerate([*layout, *[""] * MAX_GROUPS][:MAX_GROUPS])]

        fn.__name__ = f"on_expand_{i}"
        return fn

    def _resync_view(self, session: Session) -> Any:
        """After a failed move: the group view of the session's Tune weights, marked new so that its change fires
        and the page's controls (the "weights per" menu a user just changed, say) show those weights again."""
        try:
            return {**self.group_view_of(session, session.tune.weights), "sync": next(self._syncs)}
        except Exception:  # no pool: nothing to show
            return gr.skip()
