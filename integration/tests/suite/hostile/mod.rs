//! Hostile input beside legitimate traffic (issue 17): each module sends one class of attack
//! together with honest requests and asserts the honest side is untouched.

mod connections;
mod floods;
mod recovery_scope;
mod revoke_all_scale;
mod store_text;
