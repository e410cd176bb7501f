//! The UDP proxy on a loop: one upstream socket (`Assoc`) per client address, created on the
//! client's first datagram, bounded by the listener's `max_workers`.

use std::sync::Arc;

use mio::{Interest, Token};

use super::{Entry, Loop};
use crate::event::proxy::Assoc;
use crate::event::DatagramJob;

impl Loop {
    pub(super) fn datagram(&mut self, d: DatagramJob) {
        if self.retiring {
            return;
        }
        let idx = match self.assocs.get(&d.client) {
            Some(&i) => i,
            None => {
                if self.assocs.len() >= d.max {
                    log::warn!(
                        "listener `{}` peer {}: UDP proxy: {} associations open (max_workers); \
                         datagram dropped",
                        self.ctx.name,
                        d.client,
                        self.assocs.len()
                    );
                    return;
                }
                let a = match Assoc::open(
                    Arc::clone(&d.settings),
                    d.client,
                    d.reply.clone(),
                    self.ctx.listener,
                ) {
                    Ok(a) => a,
                    Err(e) => {
                        log::warn!(
                            "listener `{}` peer {}: UDP proxy: {e}",
                            self.ctx.name,
                            d.client
                        );
                        return;
                    }
                };
                let i = self.insert(Entry::Assoc(Box::new(a)));
                if let Some(Some(Entry::Assoc(a))) = self.slab.get_mut(i) {
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut a.sock, Token(i * 2), Interest::READABLE)
                    {
                        log::warn!(
                            "listener `{}`: UDP proxy: cannot watch socket: {e}",
                            self.ctx.name
                        );
                        self.slab[i] = None;
                        self.free.push(i);
                        return;
                    }
                }
                self.assocs.insert(d.client, i);
                i
            }
        };
        if let Some(Some(Entry::Assoc(a))) = self.slab.get_mut(idx) {
            a.forward(&d.data);
        }
    }

    pub(super) fn remove_assoc(&mut self, i: usize) {
        let Some(Some(Entry::Assoc(_))) = self.slab.get(i) else {
            return;
        };
        if let Some(Some(Entry::Assoc(mut a))) = self.slab.get_mut(i).map(Option::take) {
            let _ = self.poll.registry().deregister(&mut a.sock);
            self.free.push(i);
            log::debug!(
                "listener `{}`: UDP association for {} (listener {}) expired",
                self.ctx.name,
                a.client,
                a.listener
            );
        }
    }
}
