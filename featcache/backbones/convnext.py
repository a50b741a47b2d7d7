"""ConvNeXt-Tiny (Liu et al., 2022); cut points are the ends of its four stages. It normalises its own input."""

from featcache.backbones.spec import BackboneSpec

CONVNEXT_TINY = BackboneSpec(
    name="convnext_tiny",
    application="keras.applications.convnext.ConvNeXtTiny",
    layers=("convnext_tiny_stage_0_block_2_identity", "convnext_tiny_stage_1_block_2_identity",
            "convnext_tiny_stage_2_block_8_identity", "convnext_tiny_stage_3_block_2_identity"),
    default_layer="convnext_tiny_stage_2_block_8_identity",
    weights_file="convnext_tiny_notop.h5",
    preprocessing="keras.applications.convnext.preprocess_input (identity: the model normalises its input)",
    peak_bytes_per_pixel=4 * (3 + 4 * 96 // 16 * 4),   # 4x4 stem: 96 channels at a sixteenth, MLP expansion 4x
)
