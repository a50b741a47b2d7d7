"""ResNet50 (He et al., 2015); its cut points are the outputs of the four residual stages."""

from featcache.backbones.spec import BackboneSpec

#: ResNet50's residual stages (Keras numbers them 2 to 5) and their blocks: 3, 4, 6 and 3 (He et al., table 1).
STAGE_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}

RESNET50 = BackboneSpec(
    name="resnet50",
    application="keras.applications.resnet50.ResNet50",
    layers=tuple(f"conv{stage}_block{blocks}_out" for stage, blocks in STAGE_BLOCKS.items()),
    default_layer="conv4_block6_out",
    weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    preprocessing="keras.applications.resnet50.preprocess_input (caffe: RGB->BGR, minus ImageNet channel means)",
    peak_bytes_per_pixel=4 * (3 + 64 + 3 * 64),   # the stem at half size, stage 1's 256 channels at a quarter
)
