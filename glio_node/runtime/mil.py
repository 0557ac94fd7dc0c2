"""Gated attention-MIL (ABMIL, Ilse, Tomczak and Welling 2018): a bag of tile embeddings -> slide
probabilities, and one attention weight per tile that says which tiles the call rests on.

The reference aggregator of two-stage bundles (a tile ``encoder`` network, then one
``aggregator`` per slide-level task), as STAMP, CLAM and TRIDENT deploy them.  Backend-agnostic
Keras 3, so it runs on TensorFlow on a CPU and on JAX on a GPU; the attention pooling is a
registered layer, so a saved head reloads with Keras' ``safe_mode`` on (no Lambda, no pickled
Python).

The contract every aggregator keeps, Keras or ONNX:

- input ``embeddings``: float32 (B, N, D); N (the bag: a slide's tissue tiles) is dynamic.  The
  worker sends one slide per call (B = 1, all of its N tiles); training may send fixed-size
  bags sampled from each slide (B > 1);
- outputs ``probabilities``: float32 (B, C), softmax over the task's C classes, and
  ``attention``: float32 (B, N), softmax over the bag (each row sums to 1).

Gated attention: for tile embedding h_k (after a shared Dense + ReLU projection),
a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) ); the slide vector is sum_k a_k h_k, and a
Dense + softmax on it gives the probabilities.
"""

from __future__ import annotations

import keras
from keras import layers, ops

INPUT_NAME = "embeddings"
PROBABILITIES = "probabilities"
ATTENTION = "attention"


@keras.saving.register_keras_serializable(package="glio_node")
class GatedAttentionPooling(layers.Layer):
    """(B, N, H) -> slide vectors (B, H) and attention (B, N): gated attention over the bag axis."""

    def __init__(self, attention_dim: int = 128, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(attention_dim, bool) or not isinstance(attention_dim, int) or attention_dim < 1:
            raise ValueError(f"attention_dim must be a positive integer, got {attention_dim!r}")
        self.attention_dim = attention_dim
        self.tanh_branch = layers.Dense(attention_dim, activation="tanh", name="attention_v")
        self.gate_branch = layers.Dense(attention_dim, activation="sigmoid", name="attention_u")
        self.score = layers.Dense(1, name="attention_w")

    def build(self, input_shape) -> None:
        self.tanh_branch.build(input_shape)
        self.gate_branch.build(input_shape)
        self.score.build((*input_shape[:-1], self.attention_dim))
        super().build(input_shape)

    def call(self, h):
        scores = self.score(self.tanh_branch(h) * self.gate_branch(h))  # (B, N, 1)
        attention = ops.softmax(ops.squeeze(scores, axis=-1), axis=-1)  # (B, N)
        pooled = ops.sum(h * ops.expand_dims(attention, -1), axis=1)  # (B, H)
        return pooled, attention

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1]), (input_shape[0], input_shape[1])

    def get_config(self) -> dict:
        return {**super().get_config(), "attention_dim": self.attention_dim}


def build_abmil(
    embed_dim: int,
    n_classes: int,
    hidden: int = 128,
    attention_dim: int = 64,
    dropout: float = 0.25,
    name: str = "abmil",
) -> keras.Model:
    """An ABMIL head: ``embeddings`` (B, N, embed_dim) -> ``{"probabilities": (B, n_classes),
    "attention": (B, N)}``.

    ``hidden``: width of the shared projection (Dense + ReLU + dropout) each tile embedding goes
    through before attention; ``attention_dim``: width of the gated attention branches.
    Raises ``ValueError`` naming a bad size.
    """
    for key, value in (("embed_dim", embed_dim), ("n_classes", n_classes), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be at least 2, got {n_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    bag = keras.Input((None, embed_dim), name=INPUT_NAME)
    h = layers.Dense(hidden, activation="relu", name="projection")(bag)
    h = layers.Dropout(dropout, name="projection_dropout")(h)
    pooled, attention = GatedAttentionPooling(attention_dim, name="gated_attention")(h)
    logits = layers.Dense(n_classes, name="classifier")(pooled)
    probabilities = layers.Activation("softmax", name=PROBABILITIES)(logits)
    attention = layers.Identity(name=ATTENTION)(attention)
    return keras.Model(bag, {PROBABILITIES: probabilities, ATTENTION: attention}, name=name)
