"""Training rows, from the files users have to the micro-batches of each step, by stage:

read     sources      what a path is; a source's rows as stored (.json/.jsonl, Hugging Face datasets, image refs)
         rows         the normal form (Row) and the checks every layout shares
         layouts      the LLaVA and messages layouts, each into the normal form; picking one per source
encode   video        video files decoded with PyAV, sampled and sized as Qwen's tools do (qwen-vl-utils)
         media        images, video frames, the image processor with the run's pixel limits
         encode       ChatML rendering, tokenisation and labels: one row as training sees it
check    check_cache  what the check found, kept in --output-dir for a resumed run
         model_folder the model folder agreeing with itself (tokenizer, processor, config); what a resume compares
         check        every row measured with one rule (over the ranks before training, or over a process pool
                      in `python -m ftloop.data.check`, the command)
batch    sampler      the order of rows across ranks and steps; packing rows into sequences
         positions    a micro-batch's rope positions, computed on the host by the model's own rope index
         batches      rows -> tensors: padded or packed micro-batches, evaluation batches
         loaders      the DataLoaders, --eval-ratio, and each step's micro-batches counted across the ranks

Each module imports only modules above it in this list (tests/test_layout.py holds the code to it).
"""
