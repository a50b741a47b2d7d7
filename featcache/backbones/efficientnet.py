"""EfficientNetV2-B0 (Tan & Le, 2021); cut points are the ends of its stages. It rescales its own input."""

from featcache.backbones.spec import BackboneSpec

EFFICIENTNET_V2B0 = BackboneSpec(
    name="efficientnet_v2b0",
    application="keras.applications.efficientnet_v2.EfficientNetV2B0",
    layers=("block2b_add", "block3b_add", "block4c_add", "block5e_add", "block6h_add", "top_activation"),
    default_layer="block5e_add",
    weights_file="efficientnetv2-b0_notop.h5",
    preprocessing="keras.applications.efficientnet_v2.preprocess_input (identity: the model rescales its input)",
    peak_bytes_per_pixel=4 * (3 + 3 * 32 // 4),
)
