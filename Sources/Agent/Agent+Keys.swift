import Foundation
import Libvirt
import Logging
import PoolAPI

/// The bounds on a `keys` action, checked before anything reaches a guest.
enum GuestKeys {
    static let maximumKeys = 1000
    static let maximumKeyBytes = 8 * 1024
    static let maximumRunBytes = 64 * 1024
    /// How long a re-key waits for the guest agent to answer once the guest
    /// is up (a first boot under software emulation takes minutes).
    static let guestAgentWait = Duration.seconds(300)
    /// Starts the run-once script: standard input is the script, written
    /// to a file only root reads, run with its output in a log file.
    static let runScript = #"f=$(mktemp /root/corral-user-data.XXXXXX) && cat >"$f" && chmod 700 "$f" && exec "$f" >>/var/log/corral-user-data.log 2>&1"#

    /// Why a `keys` action cannot be carried out as sent, or nil.
    static func problem(keys: [String], user: String, run: String?) -> String? {
        guard LoginUserName.isValid(user) else {
            return "the login user \(String(reflecting: String(user.prefix(40)))) is not a user name"
        }
        guard keys.count <= maximumKeys else { return "\(keys.count) keys, more than \(maximumKeys)" }
        for key in keys {
            guard key.utf8.count <= maximumKeyBytes, !key.isEmpty,
                !key.unicodeScalars.contains(where: { $0 == "\n" || $0 == "\r" || $0 == "\0" })
            else { return "a key is empty, longer than \(maximumKeyBytes) bytes or not one line" }
        }
        if let run, run.utf8.count > maximumRunBytes || !run.hasPrefix("#!") {
            return "the script to run is longer than \(maximumRunBytes) bytes or does not start with #!"
        }
        return nil
    }
}

extension Agent {
    /// Gives the guest the newest key list the pool sent, once the guest is
    /// up and its agent answers (one task per instance at a time).
    func startRekey(_ name: String) {
        state.withLock { state in
            guard state.rekeys[name] == nil else { return }
            state.rekeys[name] = Task {
                await self.runRekey(name)
                _ = self.state.withLock { $0.rekeys.removeValue(forKey: name) }
            }
        }
    }

    func runRekey(_ name: String) async {
        var waitingSince: ContinuousClock.Instant?
        while !Task.isCancelled {
            guard let instance = try? await store.instance(named: name), instance.keysPending,
                let action = instance.keysAction, let user = instance.keysUser
            else { return }
            switch instance.phase {
            case .building, .booting:
                // Reconciling ends a boot either way; the list waits for it.
                try? await Task.sleep(for: .seconds(1))
                continue
            case .active:
                break
            case .errored, .expired, .deleting:
                // Not running: the list is set if it runs again (a power-on).
                return
            }
            do {
                let domain = try await self.domain(of: instance)
                guard await domain.guestAgentAnswers() else {
                    let since = waitingSince ?? .now
                    waitingSince = since
                    if ContinuousClock.now - since > GuestKeys.guestAgentWait {
                        throw BuildError(
                            "its guest agent did not answer within \(GuestKeys.guestAgentWait.components.seconds) s (the image needs qemu-guest-agent)")
                    }
                    try await Task.sleep(for: .seconds(1))
                    continue
                }
                try await locks.withLock(name) {
                    try await domain.setAuthorizedSSHKeys(instance.authorizedKeys ?? [], user: user)
                    if let script = instance.runOnce {
                        let pid = try await domain.startInGuest(script: GuestKeys.runScript, input: Data(script.utf8))
                        self.logger.info("\(name): started its new owner's user-data in the guest (pid \(pid))", metadata: ["instance": "\(name)"])
                    }
                    try await self.store.keysApplied(name, action: action, error: nil)
                }
                logger.info("\(name): \(user) now holds \(instance.authorizedKeys?.count ?? 0) SSH keys", metadata: ["instance": "\(name)", "action": "\(action)"])
            } catch is CancellationError {
                return
            } catch {
                logger.error("\(name): setting the SSH keys of \(user) failed: \(error)", metadata: ["instance": "\(name)", "action": "\(action)"])
                try? await store.keysApplied(name, action: action, error: "setting the SSH keys of \(user) failed: \(error)")
            }
            waitingSince = nil
            reconcileWakeup.signal()
        }
    }
}
