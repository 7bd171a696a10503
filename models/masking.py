"""Validity masks of padded request lists, shared by the list losses (RankNet, LCRON)."""
import tensorflow as tf


def bool_mask(mask, like: tf.Tensor) -> tf.Tensor:
    """`mask` as a bool tensor (nonzero = real candidate); all True when mask is None."""
    if mask is None:
        return tf.ones_like(like, dtype=tf.bool)
    mask = tf.convert_to_tensor(mask)
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros_like(mask))
    return mask
