import Foundation
import PoolAPI
import Support

/// What every store decides the same way, whatever keeps its rows: new
/// names, the arithmetic of room and placement, and the words of its
/// refusals. A store fetches rows, calls these inside its transaction, and
/// writes what they decided.
enum StoreRules {
    /// A new instance's name (and hostname): `i-` and 12 hex digits.
    static func newInstanceName() -> String { "i-" + Token.generate().prefix(12) }

    /// A new id for the user-facing API: 32 hex digits, like the API document's.
    static func newID() -> String {
        UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "")
    }

    /// The lines of a stored script or key list (none for "").
    static func scriptLines(_ script: String) -> [String] {
        script.isEmpty ? [] : script.components(separatedBy: "\n")
    }

    static func imageReference(_ image: Image) -> ImageReference {
        ImageReference(
            name: image.name, url: image.url, sha256: image.sha256, diskFormat: image.diskFormat, kernelBoot: image.kernelBoot)
    }

    /// JSON text of a value, as the stores keep flavors, address lists and the like.
    static func json<T: Encodable>(_ value: T, sortedKeys: Bool = false) throws -> String {
        let encoder = JSONEncoder()
        if sortedKeys { encoder.outputFormatting = .sortedKeys }
        return String(decoding: try encoder.encode(value), as: UTF8.self)
    }

    /// A value from stored JSON text, or nil when there is none or it does not decode.
    static func decodeJSON<T: Decodable>(_ type: T.Type, _ text: String?) -> T? {
        text.flatMap { try? JSONDecoder().decode(T.self, from: Data($0.utf8)) }
    }

    /// The refusal of a create that would give no key a way in.
    static func noKeyRefusal(_ request: InstanceRequest) -> PoolError {
        .invalid(
            field: "ssh-keys",
            reason: request.sshKeys == nil
                ? "you have no SSH key, so you could not log in: add one with POST /v1/ssh-key (`corral keys add NAME --file ~/.ssh/id_ed25519.pub`)"
                : "name at least one of your SSH keys (GET /v1/ssh-key lists them), or leave ssh-keys out to use all of them")
    }

    static func unknownFlavor(_ name: String) -> PoolError {
        .invalid(field: "server-flavor", reason: "there is no flavor '\(name)'; GET /v1/server-flavor lists them")
    }

    static func unknownImage(_ name: String) -> PoolError {
        .invalid(field: "server-image", reason: "there is no image '\(name)'; GET /v1/server-image lists them")
    }

    /// Refuses a user who holds `held` of their `limit` instances already.
    static func checkLimit(name: String, held: Int, limit: Int) throws {
        guard held < limit else {
            throw PoolError.conflict("user '\(name)' holds \(held) of their \(limit) instances; delete one first")
        }
    }

    /// Refuses a new instance record of an appliance that holds `held` of the `most` it may.
    static func checkRecordRoom(appliance: String, held: Int, adding: Int, most: Int) throws {
        guard held + adding <= most else {
            throw PoolError.tooMany(
                "appliance '\(appliance)' holds \(held) instance records, the most it may (limits.max_instances_per_appliance = \(most)); decommission some (records are purged after housekeeping.purge_after_seconds)")
        }
    }

    /// Refuses an appliance that is disabled or stale.
    static func checkPlaceable(name: String, enabled: Bool, lastSeen: Date?, staleAfter: Int, at date: Date) throws {
        guard enabled else { throw PoolError.conflict("appliance '\(name)' is disabled") }
        guard let lastSeen, date.timeIntervalSince(lastSeen) <= TimeInterval(staleAfter) else {
            throw PoolError.conflict("appliance '\(name)' has not checked in for over \(staleAfter) s and takes no new instances")
        }
    }

    /// What an appliance has free: its free resources at its last check-in
    /// (`stats`, JSON), less the instances placed on it whose start it has
    /// not acknowledged yet (`pending`, their flavors as JSON; its stats
    /// count an instance from the check-in that acknowledges the start).
    /// Nil before its first check-in.
    static func freeRoom(stats: String?, pending: [String]) -> InstanceFlavor? {
        guard let free = decodeJSON(HypervisorStats.self, stats) else { return nil }
        let flavors = pending.compactMap { decodeJSON(InstanceFlavor.self, $0) }
        // Reported numbers are bounded where they arrive; records from
        // before those bounds are still summed without overflowing.
        func left(_ free: Int, _ used: KeyPath<InstanceFlavor, Int>) -> Int {
            let total = flavors.reduce(0) { sum, flavor in
                let (next, overflow) = sum.addingReportingOverflow(max(0, flavor[keyPath: used]))
                return overflow ? Int.max : next
            }
            return max(0, free) - min(total, max(0, free) + 1)
        }
        return InstanceFlavor(
            vcpus: left(free.vcpus.free, \.vcpus), memory: left(free.memoryMiB.free, \.memory), disk: left(free.diskGiB.free, \.disk))
    }

    /// Refuses a placement of `size` on an appliance with `free` room (nil: not reported yet).
    static func checkRoom(_ free: InstanceFlavor?, for size: InstanceFlavor, appliance: String) throws {
        guard let free else { throw PoolError.conflict("appliance '\(appliance)' has not reported its capacity yet") }
        guard size.fits(in: free) else {
            throw PoolError.conflict(
                "appliance '\(appliance)' has no room for \(size.vcpus) vCPUs, \(size.memory) MiB and \(size.disk) GiB (free: \(free.vcpus) vCPUs, \(free.memory) MiB, \(free.disk) GiB)"
            )
        }
    }

    /// How good a home an appliance with `free` room is for `size` (higher
    /// is better), or nil when it does not fit: first how many more of the
    /// same size would still fit there after it, then the memory left. This
    /// spreads instances across appliances in proportion to their room.
    static func placementScore(of size: InstanceFlavor, in free: InstanceFlavor) -> (Int, Int)? {
        guard size.fits(in: free) else { return nil }
        let left = InstanceFlavor(vcpus: free.vcpus - size.vcpus, memory: free.memory - size.memory, disk: free.disk - size.disk)
        let more = min(
            size.vcpus > 0 ? left.vcpus / size.vcpus : Int.max, size.memory > 0 ? left.memory / size.memory : Int.max,
            size.disk > 0 ? left.disk / size.disk : Int.max)
        return (more, left.memory)
    }

    /// Why an enabled appliance is not counted for placement now (it has
    /// not checked in with its capacity, or it is stale), or nil when it is.
    static func unseenReason(name: String, lastSeen: Date?, hasStats: Bool, staleAfter: Int, at date: Date) -> String? {
        guard let lastSeen, hasStats else { return "appliance '\(name)' has not checked in yet" }
        let seconds = Int(date.timeIntervalSince(lastSeen).rounded())
        guard seconds > staleAfter else { return nil }
        return "appliance '\(name)' was last seen \(seconds) s ago (stale after \(staleAfter) s)"
    }

    /// The refusal when no appliance has room; `waiting` names those that
    /// might once they check in.
    static func noRoom(flavor: String, size: InstanceFlavor, region: String?, waiting: [String]) -> PoolError {
        let scope = region.map { " in region '\($0)'" } ?? ""
        let wanted = "no appliance\(scope) has room for flavor '\(flavor)' (\(size.vcpus) vCPUs, \(size.memory) MiB, \(size.disk) GiB)"
        guard waiting.isEmpty else {
            return .unavailable("\(wanted): \(waiting.joined(separator: "; ")); try again once it has checked in")
        }
        return .unavailable("\(wanted); try again later or a smaller flavor")
    }

    /// The public key lines a create installs: the named keys of the owner
    /// (ids or names), or all of them when `chosen` is nil.
    static func chosenKeys(_ keys: [SSHKey], _ chosen: [String]?) throws -> [String] {
        guard let chosen else { return keys.map(\.publicKey) }
        return try chosen.map { wanted in
            guard let key = keys.first(where: { $0.id == wanted || $0.name == wanted }) else {
                throw PoolError.invalid(field: "ssh-keys", reason: "you have no SSH key '\(wanted.prefix(64))'; GET /v1/ssh-key lists yours")
            }
            return key.publicKey
        }
    }

    /// Refuses a new key for a user who has `count` of `maxKeys`, or this key already (as `clash`).
    static func checkNewKey(count: Int, maxKeys: Int, clash: String?, fingerprint: String) throws {
        guard count < maxKeys else {
            throw PoolError.conflict("you have \(count) SSH keys, the most a user may keep (limits.max_ssh_keys_per_user); delete one first")
        }
        if let clash { throw PoolError.conflict("you added this key already, as '\(clash)' (\(fingerprint))") }
    }

    /// The refusal of a lease change that would end too far ahead, or nil.
    static func checkLeaseEnd(_ expires: Date, atMost most: Int, at date: Date) throws {
        guard expires.timeIntervalSince(date) <= TimeInterval(most) else {
            throw PoolError.invalid(
                field: "task.seconds",
                reason: "the lease would end \(Int(expires.timeIntervalSince(date))) s from now; it may end at most \(most) s from now (limits.max_lease_seconds)")
        }
    }

    /// The keys a create's boot wisp gives when the create names none of the
    /// owner's: only a wisp without a callback gives keys, and a template's
    /// wisp only to its own owner's instances.
    static func wispKeysForCreate(_ wisp: Wisp?, fromTemplate: Bool, owner: String) -> [String] {
        (wisp?.callbackURL ?? "").isEmpty && (!fromTemplate || wisp?.owner == owner) ? wisp?.sshKeys ?? [] : []
    }

    /// What boots an instance, from what its store found: its create's own
    /// image (when it has one), else its boot wisp's image or dynamic URL;
    /// with the wisp's keys and script, then the instance's own keys
    /// (`ownKeys`) and user-data. `wispImage` is the catalogue image the
    /// wisp names, if there is one.
    static func bootSource(
        instance name: String, callbackURL: String?, ownImage: Image?, wisp: Wisp?, wispImage: Image?, wispKeys: [String],
        ownKeys: [String], userData: String?
    ) throws -> BootSource {
        func withOwn(_ parameters: StartParameters) -> StartParameters {
            var parameters = parameters
            for key in ownKeys where !parameters.sshKeys.contains(key) { parameters.sshKeys.append(key) }
            parameters.userData = userData
            return parameters
        }
        if let callbackURL, !callbackURL.isEmpty { return .callback(callbackURL) }
        // An instance created with its own image (the user-facing API)
        // boots that image with the SSH keys and script of the wisp, if any.
        if let ownImage {
            let usable = wisp.map { $0.callbackURL?.isEmpty ?? true } ?? false
            return .parameters(
                withOwn(
                    StartParameters(
                        image: imageReference(ownImage), sshKeys: wispKeys,
                        postCreate: usable ? scriptLines(wisp?.postCreate ?? "") : [])))
        }
        guard let wisp else {
            throw PoolError.unavailable(
                "instance '\(name)' has no wisp to boot from: neither its own, nor its owner's default, nor a system default (add one with `corral pool wisp add NAME --owner USER --image IMAGE --system-default`)")
        }
        if let callback = wisp.callbackURL, !callback.isEmpty { return .callback(callback) }
        let reference: ImageReference
        if wisp.image != nil, let found = wispImage {
            reference = imageReference(found)
        } else if let url = wisp.dynamicImageURL {
            // The appliance checks the real format with qemu-img before use.
            reference = ImageReference(name: "dynamic", url: url, diskFormat: url.hasSuffix(".raw") ? "raw" : "qcow2")
        } else {
            throw PoolError.unavailable(
                "wisp '\(wisp.name)' names image '\(wisp.image ?? "")', which is not in the catalogue; add it with `corral pool image add`")
        }
        return .parameters(withOwn(StartParameters(image: reference, sshKeys: wispKeys, postCreate: scriptLines(wisp.postCreate))))
    }
}

extension InstanceFlavor {
    /// Whether an instance of this size fits in `free`.
    func fits(in free: InstanceFlavor) -> Bool {
        vcpus <= free.vcpus && memory <= free.memory && disk <= free.disk
    }
}
