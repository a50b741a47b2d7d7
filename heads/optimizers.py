"""The Adam every head trains with: Keras' Adam, whose update on TensorFlow is one fused kernel per weight.

Keras' Adam updates a weight with about fifteen separate TensorFlow ops, each a pass over the weight, its moments or
a temporary (JAX compiles them into one). For the small heads featcache trains that memory traffic is a large part
of a step: TensorFlow's ResourceApplyAdam does the same arithmetic (Kingma & Ba's update with epsilon outside the
square root, as Keras writes it) in one pass, and the heads' epochs on this CPU shrink with it (docs/results,
section 14). Other backends keep Keras' own update.

`head_rates`: a model holding several heads (heads.together) scales the step of head k's weights by
`optimizer.head_rates[k]`; a rate of 0 freezes that head.
"""

from __future__ import annotations


def adam(learning_rate, owners: dict | None = None):
    """A Keras Adam at `learning_rate` (a float or a schedule). `owners` maps id(weight) -> head index for a model of
    several heads: the optimizer then has a `head_rates` variable (one factor per head, 1 to start with).

    It stays a plain `keras.optimizers.Adam` (its steps are replaced on the instance), so a saved model's
    compile config names Keras' Adam and loads anywhere without featcache."""
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    keras_build, keras_step = optimizer.build, optimizer.update_step
    fused = keras.backend.backend() == "tensorflow"

    def build(variables):
        keras_build(variables)
        if owners is not None:
            optimizer._owners = tuple(owners[id(v)] for v in variables)
            optimizer.head_rates = optimizer.add_variable((max(owners.values()) + 1,), initializer="ones",
                                                          name="head_rates")

    def update_step(gradient, variable, learning_rate):
        if owners is not None:
            learning_rate = learning_rate * optimizer.head_rates[
                optimizer._owners[optimizer._get_variable_index(variable)]]
        if fused:
            _fused_update(optimizer, gradient, variable, learning_rate)
        else:
            keras_step(gradient, variable, learning_rate)

    optimizer.build, optimizer.update_step = build, update_step
    return optimizer


def _fused_update(optimizer, gradient, variable, learning_rate) -> None:
    """Keras' Adam step for `variable` as one TensorFlow kernel (no AMSGrad: featcache never asks for it)."""
    import tensorflow as tf

    dtype = variable.dtype
    index = optimizer._get_variable_index(variable)   # Keras keeps the moments in lists, by weight
    step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=optimizer._momentums[index].handle, v=optimizer._velocities[index].handle,
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
        beta1=beta_1, beta2=beta_2, epsilon=tf.cast(optimizer.epsilon, dtype), grad=tf.cast(gradient, dtype))
