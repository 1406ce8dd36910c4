import CloudInit
import Foundation
import Libvirt
import Logging
import PoolAPI
import Support

extension Agent {
    // MARK: Builds

    func startBuild(_ name: String) {
        state.withLock { state in
            guard state.builds[name] == nil else { return }
            state.builds[name] = Task {
                await self.runBuild(name)
                _ = self.state.withLock { $0.builds.removeValue(forKey: name) }
            }
        }
    }

    func runBuild(_ name: String) async {
        do {
            // The start parameters come first, outside the build slots: the
            // pool may be following a slow callback for them, which must
            // delay only this instance, never the others' builds.
            guard let instance = try await store.instance(named: name), instance.phase == .building else { return }
            let parameters = try await startParameters(for: instance)
            try Task.checkCancellation()
            try await buildSlots.withPermit {
                metrics.buildsInFlight.increment()
                defer { metrics.buildsInFlight.decrement() }
                try await self.build(name, parameters: parameters)
            }
        } catch is CancellationError {
            logger.notice("build of \(name) interrupted; it starts over when the agent runs again", metadata: ["instance": "\(name)"])
        } catch {
            logger.error("build of \(name) failed: \(error)", metadata: ["instance": "\(name)"])
            _ = try? await store.update(name) {
                $0.phase = .errored
                $0.lastError = "\(error)"
            }
            reconcileWakeup.signal()
        }
    }

    /// Builds and starts an instance: start parameters, image, overlay,
    /// seed, domain. A step that fails removes what it made; what earlier
    /// steps made stays for inspection until the instance is deleted.
    func build(_ name: String, parameters: StartParameters) async throws {
        guard let instance = try await store.instance(named: name), instance.phase == .building else { return }
        let started = ContinuousClock.now
        // A build that was interrupted starts over from nothing: one domain,
        // one disk, whatever happened before.
        try await removeArtifacts(of: instance)
        let (base, virtualSize) = try await images.image(parameters.image, forInstance: name)
        var kernel: (kernel: String, initrd: String?, cmdline: String)?
        if let boot = parameters.image.kernelBoot {
            let what = "the kernel of image '\(parameters.image.name)'"
            let kernelPath = try await images.file(boot.kernel, what: what, forInstance: name)
            var initrdPath: String?
            if let initrd = boot.initrd {
                initrdPath = try await images.file(initrd, what: "the initrd of image '\(parameters.image.name)'", forInstance: name)
            }
            kernel = (kernelPath, initrdPath, boot.cmdline)
        }
        var stepStarted = ContinuousClock.now
        func stepDone(_ step: String) {
            metrics.buildStep(step, ContinuousClock.now - stepStarted)
            stepStarted = .now
        }
        stepDone("image")
        try await store.record(.imageReady, of: name, at: Date())
        try Task.checkCancellation()
        try await makeOverlay(for: instance, base: base, format: parameters.image.diskFormat, virtualSize: virtualSize)
        stepDone("disk")
        let seed = Seed(
            instanceID: instance.uuid, hostname: name, instanceName: name, poolURL: configuration.poolURL,
            sshKeys: parameters.sshKeys, postCreate: parameters.postCreate.joined(separator: "\n"),
            macAddress: instance.macAddress, ownUserData: parameters.userData ?? "")
        do {
            try await seed.writeImage(to: try paths.seed(name))
            // It holds the post-create script: root's, readable by QEMU's group only.
            try FileModes.set(try paths.seed(name), mode: 0o640, group: qemuGroup)
        } catch {
            throw BuildError("cannot write the cloud-init seed: \(error)")
        }
        stepDone("seed")
        try await store.record(.seedWritten, of: name, at: Date())
        try Task.checkCancellation()
        let template = DomainTemplate(
            name: name, uuid: instance.uuid, virtType: virtType.rawValue, flavor: instance.flavor, disk: try paths.disk(name),
            base: (base, parameters.image.diskFormat), seed: try paths.seed(name), consoleLog: try paths.console(name), macAddress: instance.macAddress,
            network: configuration.network, sshPort: instance.sshPort, kernel: kernel, metadata: metadata(for: instance))
        let domain: Domain
        do {
            domain = try await connection.defineDomain(xml: template.xml())
        } catch let error as LibvirtError {
            throw BuildError("libvirt refused the domain definition: \(error.message)")
        }
        stepDone("define")
        try await store.record(.domainDefined, of: name, at: Date())
        try await locks.withLock(name) {
            do {
                try await domain.start()
            } catch let error as LibvirtError {
                throw BuildError("libvirt could not start the domain: \(error.message)")
            }
            let now = Date()
            try await self.store.update(name) {
                $0.phase = .booting
                $0.bootedAt = now
            }
            try await self.store.record(.domainStarted, of: name, at: now)
        }
        stepDone("start")
        logger.info("\(name) started", metadata: ["instance": "\(name)", "seconds": "\(ContinuousClock.now - started)"])
        startWatch(name)
        reconcileWakeup.signal()
    }

    /// Watches a launch until the guest has finished cloud-init and
    /// answers on SSH (see LaunchWatch.swift).
    func startWatch(_ name: String) {
        state.withLock { state in
            guard state.watches[name] == nil else { return }
            state.watches[name] = Task {
                await self.watchLaunch(name)
                _ = self.state.withLock { $0.watches.removeValue(forKey: name) }
            }
        }
    }

    /// Reports the instance as starting; the reply is its start parameters.
    /// Waits out an unreachable pool; a refusal fails the build.
    func startParameters(for instance: LocalInstance) async throws -> StartParameters {
        var backoff = Backoff()
        while true {
            try Task.checkCancellation()
            do {
                let timeline = try await store.timeline(of: instance.name)
                let report = InstanceReport(
                    name: instance.name, state: .starting, flavor: instance.flavor,
                    expires: instance.expires.map { Int($0.timeIntervalSince1970) }, timeline: timeline)
                // Long enough for the pool to follow the longest callback chain
                // it allows (callbacks.timeout_seconds is at most 60 s).
                let parameters = try await client.report(report, timeout: .seconds(75))
                state.withLock {
                    $0.reported[instance.name] = Reported(
                        state: .starting, error: nil, addresses: [], phases: Reported.agentPhases(timeline))
                }
                return parameters
            } catch let error as PoolClientError {
                if case .refused(let status, let message) = error, status != 401, status != 409, !error.isTransient {
                    throw BuildError("the pool gave no start parameters (\(status)): \(message)")
                }
                let delay = backoff.next()
                logger.warning("cannot get start parameters of \(instance.name): \(error); next try in \(delay)", metadata: ["instance": "\(instance.name)"])
                try await Task.sleep(for: delay)
            }
        }
    }

    /// Makes the instance's disk: a qcow2 overlay on the cached base image,
    /// sized to the flavor. The base passed ``ImageGate`` (which measured
    /// its virtual size as QEMU's user), so `qemu-img create -u` writes the
    /// new header without opening the untrusted base as root.
    func makeOverlay(for instance: LocalInstance, base: String, format: String, virtualSize: Int64) async throws {
        let wanted = Int64(instance.flavor.disk) << 30
        guard virtualSize <= wanted else {
            throw BuildError(
                "the image is \(virtualSize) bytes, larger than the flavor's disk of \(instance.flavor.disk) GiB; choose a bigger flavor")
        }
        let path = try paths.disk(instance.name)
        let result = try await runProgram(
            "qemu-img", ["create", "-q", "-u", "-f", "qcow2", "-F", format, "-b", base, path, "\(wanted)"])
        guard result.status == 0 else {
            try? FileManager.default.removeItem(atPath: path)
            throw BuildError("cannot create the instance's disk: \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        try FileModes.set(path, mode: 0o640, group: qemuGroup)
    }

    /// Removes the instance's domain and files, whatever exists of them.
    func removeArtifacts(of instance: LocalInstance) async throws {
        if let domain = try? await domain(of: instance) {
            if try await domain.state().isActive {
                do { try await domain.destroy() } catch let error as LibvirtError where error.code == .operationInvalid {}
            }
            do {
                try await domain.undefine()
            } catch let error as LibvirtError where error.code == .noDomain {}
        }
        let seed = try paths.seed(instance.name)
        let console = try paths.console(instance.name)
        // virtlogd rotates the console log to CONSOLE.0, .1, ... (max_backups).
        let rotated = ((try? FileManager.default.contentsOfDirectory(atPath: paths.consoles)) ?? [])
            .filter { $0.hasPrefix(instance.name + ".log.") && $0.dropFirst(instance.name.count + 5).allSatisfy(\.isNumber) }
            .map { "\(paths.consoles)/\($0)" }
        for path in [try paths.disk(instance.name), seed, seed + ".part", console] + rotated {
            if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
        }
    }

    // MARK: Decommissioning

    func startDecommission(_ name: String) {
        state.withLock { state in
            guard state.decommissions[name] == nil else { return }
            let build = state.builds[name]
            state.watches[name]?.cancel()
            state.decommissions[name] = Task {
                // A build in progress stops first; its leftovers go with the rest.
                build?.cancel()
                await build?.value
                do {
                    try await self.decommission(name)
                } catch is CancellationError {
                } catch {
                    self.logger.error("decommissioning \(name) failed: \(error); retrying at the next start", metadata: ["instance": "\(name)"])
                }
                _ = self.state.withLock { $0.decommissions.removeValue(forKey: name) }
            }
        }
    }

    /// Destroys and undefines the domain, deletes its disk, seed and
    /// console, reports the instance decommissioned, and forgets it.
    func decommission(_ name: String) async throws {
        try await locks.withLock(name) {
            guard let instance = try await self.store.instance(named: name) else { return }
            try await self.removeArtifacts(of: instance)
            try await self.store.enqueue(InstanceReport(name: name, state: .decommissioned, flavor: instance.flavor), at: Date())
            try await self.store.remove(name)
            _ = self.state.withLock { $0.reported.removeValue(forKey: name) }
            self.logger.info("\(name) decommissioned", metadata: ["instance": "\(name)"])
        }
        outboxWakeup.signal()
    }
}
