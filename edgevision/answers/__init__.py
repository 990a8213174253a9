"""How a question is answered: the answer mode its words call for, and the safety rules kept outside the model.

`modes` picks read (say the recognised text verbatim), answer (the decoder answers with the recognised text
in its prompt) or describe (the decoder answers from the image alone); `safety` decides when the model must
not answer at all (medicine, allergens, money, dates) and builds the verbatim replies, and checks that a
generated answer names no number the recognised text does not hold.
"""
