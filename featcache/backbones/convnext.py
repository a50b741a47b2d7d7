"""ConvNeXt-Tiny (Liu et al., 2022); cut points are the ends of its four stages. It normalises its own input.

A ConvNeXt block ends in `inputs + identity(branch)`, and Keras does not name that sum: the layer called
`..._block_2_identity` is the residual branch alone (scaled by its layer scale), not the stage's output. So the
first three stage outputs are the inputs of the downsampling layer after them, and the last is the model's
output (the stage's output, layer-normalised)."""

from featcache.backbones.spec import BackboneSpec

CONVNEXT_TINY = BackboneSpec(
    name="convnext_tiny",
    application="keras.applications.convnext.ConvNeXtTiny",
    layers=("convnext_tiny_stage_0_out", "convnext_tiny_stage_1_out", "convnext_tiny_stage_2_out", "convnext_tiny_top"),
    default_layer="convnext_tiny_stage_2_out",
    inputs_of=(("convnext_tiny_stage_0_out", "convnext_tiny_downsampling_block_0"),
               ("convnext_tiny_stage_1_out", "convnext_tiny_downsampling_block_1"),
               ("convnext_tiny_stage_2_out", "convnext_tiny_downsampling_block_2"),
               ("convnext_tiny_top", "")),
    weights_file="convnext_tiny_notop.h5",
    preprocessing="keras.applications.convnext.preprocess_input (identity: the model normalises its input)",
    peak_bytes_per_pixel=4 * (3 + 4 * 96 // 16 * 4),   # 4x4 stem: 96 channels at a sixteenth, MLP expansion 4x
)
