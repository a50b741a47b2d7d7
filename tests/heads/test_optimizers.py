"""The heads' Adam (heads.optimizers): Keras' Adam step (fused into one kernel on TensorFlow), per-head rates, and
models compiled with it that save and load with Keras alone."""

import keras
import numpy as np

from heads import optimizers


def model(seed: int = 0, heads: int = 1):
    """`heads` small softmax classifiers side by side on one input (their outputs concatenated)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    layers = [(keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3, activation="softmax"))
              for _ in range(heads)]
    outs = [top(hidden(inputs)) for hidden, top in layers]
    m = keras.Model(inputs, outs[0] if heads == 1 else keras.layers.Concatenate()(outs))
    m.owners = {id(v): k for k, pair in enumerate(layers) for layer in pair for v in layer.trainable_variables}
    return m


def data(rows: int = 256):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 6)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)


def trained(optimizer, epochs: int = 3):
    m, (x, y) = model(), data()
    m.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    m.fit(x, y, batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    return m


def test_the_heads_adam_takes_keras_adams_steps():
    # the same update, in another order of float operations on TensorFlow: measured within 1e-7 here
    ours, keras_own = trained(optimizers.adam(3e-3)), trained(keras.optimizers.Adam(3e-3))
    for a, b in zip(ours.get_weights(), keras_own.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert not np.allclose(ours.get_weights()[0], model().get_weights()[0])   # it did train


def test_a_head_rate_of_zero_freezes_that_head_only():
    m, (x, y) = model(heads=2), data()
    owners = m.owners
    first = {id(v): np.array(v) for v in m.trainable_variables}
    optimizer = optimizers.adam(1e-2, owners)
    m.compile(optimizer=optimizer, loss=lambda t, p: keras.losses.sparse_categorical_crossentropy(t, p[:, :3])
              + keras.losses.sparse_categorical_crossentropy(t, p[:, 3:]))
    optimizer.build(m.trainable_variables)
    optimizer.head_rates.assign(np.array([1.0, 0.0], np.float32))
    m.fit(x, y, batch_size=32, epochs=2, verbose=0)
    moved = {owners[id(v)]: not np.array_equal(np.array(v), first[id(v)]) for v in m.trainable_variables}
    assert moved == {0: True, 1: False}


def test_a_model_trained_with_it_saves_and_loads_with_keras_alone(tmp_path):
    # the compile config names Keras' own Adam: plain keras.saving.load_model needs no featcache class
    m = trained(optimizers.adam(1e-3), epochs=1)
    m.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert type(loaded.optimizer) is keras.optimizers.Adam
    x, _ = data(8)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
